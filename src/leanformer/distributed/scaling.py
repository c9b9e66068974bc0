"""What tensor parallel costs and what it could buy: a decode-step model checked against measurement.

Run under torchrun, one process per rank:

    torchrun --standalone --nproc-per-node 2 -m leanformer.distributed.scaling MODEL [--steps 64] [--split pp]

Per decode step a tensor-parallel Llama does 1/N of the layer math plus 2 all-reduces of [B, 1, hidden]
per layer, so

    step(N) ≈ step_module_path(1) / N + 2 × layers × allreduce(hidden)   (embedding / LM head: replicated,
                                                                           counted in step(1) / N: a
                                                                           lower bound on step(N))

This measures allreduce(hidden) (median over many calls), the single-process step on the module
path (the path the sharded model takes; the fused C++ step is shown too) and the sharded step, and
prints the prediction next to what was measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from leanformer.distributed.pipeline import pipeline_
from leanformer.distributed.tensor_parallel import parallelize_
from leanformer.models.kv_cache import KVCache


def allreduce_s(numel: int, repeats: int = 500) -> float:
    """Median seconds of one all_reduce(SUM) of `numel` fp32 values over the default group."""
    x = torch.randn(numel)
    times = []
    for _ in range(20):  # warm the connections
        dist.all_reduce(x)
    for _ in range(repeats):
        t = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def decode_step_s(model: nn.Module, steps: int = 64, prompt: int = 16) -> float:
    """Median seconds of one batch-1 decode step (one token through all layers + LM head)."""
    cache = KVCache.for_model(model, 1, prompt + steps + 1)
    slots = torch.tensor([0])
    ids = torch.arange(1, prompt + 1)[None] % model.args.vocab_size
    token = model(ids, cache, slots)[:, -1:].argmax(-1)
    cache.advance(slots, prompt)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = model(token, cache, slots).argmax(-1)  # [1, 1]
        times.append(time.perf_counter() - t)
        cache.advance(slots, 1)
    return statistics.median(times)


def predict_step_s(step_1: float, size: int, layers: int, allreduce: float) -> float:
    """The model above: compute shared by `size` ranks, two all-reduces per layer on the critical path."""
    return step_1 / size + 2 * layers * allreduce


def measure(path: str, steps: int, repeats: int, split: str = "tp") -> dict | None:
    """Every rank calls this; rank 0 returns the figures (the others None). split="pp" times the
    pipeline-parallel step instead of the tensor-parallel one."""
    from leanformer.hub import resolve_model
    from leanformer.loading import load

    rank, size = dist.get_rank(), dist.get_world_size()
    model, _ = load(resolve_model(path))
    a = model.args
    out: dict = {"ranks": size, "layers": a.num_hidden_layers, "hidden": a.hidden_size}
    out["allreduce_hidden_us"] = 1e6 * allreduce_s(a.hidden_size, repeats)
    # single process, while the other ranks wait: nothing else of ours competes for the cores
    if rank == 0:
        out["step_1proc_fused_ms"] = 1e3 * decode_step_s(model, steps)
        model.fused_decode = False
        out["step_1proc_module_ms"] = 1e3 * decode_step_s(model, steps)
        out["layer_module_ms"] = out["step_1proc_module_ms"] / a.num_hidden_layers
    dist.barrier()
    if split == "pp":
        pipeline_(model)
        out[f"step_pp{size}_ms"] = 1e3 * decode_step_s(model, steps)
        out[f"measured_pp{size}_tok_s"] = 1e3 / out[f"step_pp{size}_ms"]
    elif a.num_key_value_heads % size == 0:  # else: figures and predictions only, no sharded run
        parallelize_(model)
        out[f"step_tp{size}_ms"] = 1e3 * decode_step_s(model, steps)
    if rank != 0:
        return None
    allreduce = 1e-3 * out["allreduce_hidden_us"]  # ms
    # the all-reduce measured at this world size stands in for every N: on real hosts it depends on the
    # network and grows with N (ring: 2(N-1)/N of the data, 2(N-1) latency hops)
    for n in [d for d in range(1, 9) if a.num_key_value_heads % d == 0]:  # the sizes TP allows
        step = predict_step_s(
            out["step_1proc_module_ms"], n, a.num_hidden_layers, allreduce if n > 1 else 0.0
        )
        out[f"predicted_tp{n}_tok_s"] = 1e3 / step
    if f"step_tp{size}_ms" in out:
        out[f"measured_tp{size}_tok_s"] = 1e3 / out[f"step_tp{size}_ms"]
        # what each all-reduce cost inside decode, if the compute split perfectly: the waits for the
        # slower rank (and, on an oversubscribed machine, for a descheduled one) land here
        excess = out[f"step_tp{size}_ms"] - out["step_1proc_module_ms"] / size
        out["effective_allreduce_us"] = 1e3 * excess / (2 * a.num_hidden_layers)
    out["measured_1proc_module_tok_s"] = 1e3 / out["step_1proc_module_ms"]
    out["measured_1proc_fused_tok_s"] = 1e3 / out["step_1proc_fused_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m leanformer.distributed.scaling", description=__doc__)
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (median)")
    p.add_argument("--repeats", type=int, default=500, help="timed all-reduces (median)")
    p.add_argument("--split", choices=["tp", "pp"], default="tp", help="tensor or pipeline parallel")
    args = p.parse_args(argv)
    if not dist.is_torchelastic_launched():
        p.error(
            "run under torchrun: torchrun --standalone --nproc-per-node N -m leanformer.distributed.scaling MODEL"
        )
    dist.init_process_group("gloo")  # torchrun's rank / address (env://)
    try:
        result = measure(args.model, args.steps, args.repeats, args.split)
    finally:
        dist.destroy_process_group()
    if result is not None:
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
