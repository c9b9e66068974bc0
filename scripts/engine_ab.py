"""What the engine-loop A/B scripts share (tokens_path_ab.py, fixed_model_ab.py): their arguments, the
thread count, the CPU line every figure carries, and the model kept quantized."""

from __future__ import annotations

import argparse

import torch


def setup(doc: str) -> tuple[argparse.Namespace, torch.nn.Module]:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    a = p.parse_args()
    from leanformer.kernels import cpu
    from leanformer.loading import load

    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu.cpu_info()['model']}")  # figures name the CPU they come from
    model, _ = load(a.model, keep_quantized=True)
    return a, model
