"""Micro-benchmark of the encoder's attention paths (models/bert._attention) on CPU fp32.

    python -m leanformer.measure.bench.attention [--threads 2] [--repeats 15] [--shapes 16x12x256x32 ...]

Per shape [B, H, T, D] it times torch's SDPA, matmul + softmax + matmul (the kernels-less path up to
bert.SHORT_SEQ tokens) and the fused kernel (kernels/attention.cpp) once per instruction set the CPU
has (``set_isa``). q/k/v are views of one [B, T, 3, H, D] tensor, as the encoder slices its fused QKV
projection; no mask. The variants run in alternating rounds in one process, so machine noise hits all
of them alike; the table reports the median milliseconds per call and each variant's largest error
relative to SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from leanformer import kernels

SHAPES = [(16, 12, 256, 32), (32, 12, 16, 32), (16, 12, 256, 64)]


def _matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(-1), v)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernels.ext().attention(q, k, v, None).transpose(1, 2)


def variants() -> dict[str, tuple[str | None, Callable[..., torch.Tensor]]]:
    """name -> (instruction set to select before timing it, or None; function of q, k, v)."""
    out = {"SDPA": (None, F.scaled_dot_product_attention), "matmul+softmax": (None, _matmul)}
    if kernels.available():
        for isa in reversed(kernels.isas()):  # avx512 first where the CPU has it
            out[f"fused {isa}"] = (isa, _fused)
    return out


def _time(f: Callable[[], torch.Tensor], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) * 1e3 / calls


def bench_shape(shape: tuple[int, int, int, int], repeats: int) -> dict[str, tuple[float, float]]:
    """-> {variant: (median ms per call, max |error| / max |SDPA|)} for q/k/v [B, H, T, D] = shape."""
    b, h, t, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, t, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    fs = variants()
    want = F.scaled_dot_product_attention(q, k, v)

    def sample(name: str, calls: int) -> float:
        isa, f = fs[name]
        if isa:
            kernels.set_isa(isa)  # outside the timed calls
        return _time(lambda: f(q, k, v), calls)

    err = {}
    for name, (isa, f) in fs.items():
        if isa:
            kernels.set_isa(isa)
        err[name] = float((f(q, k, v) - want).abs().max() / want.abs().max())
    first = {name: sample(name, 1) for name in fs}  # warm-up
    calls = {name: max(1, int(50 / max(ms, 1e-3))) for name, ms in first.items()}  # ~50 ms per sample
    times: dict[str, list[float]] = {name: [] for name in fs}
    names = list(fs)
    try:
        for rep in range(repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                times[name].append(sample(name, calls[name]))
    finally:
        if kernels.available():
            kernels.set_isa(None)
    return {name: (statistics.median(ts), err[name]) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=15, help="samples per variant (median reported)")
    p.add_argument("--shapes", nargs="+", default=None, help="BxHxTxD, e.g. 16x12x256x32")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, kernels {kernels.isas() or 'none'}")
    with torch.inference_mode():
        rows = [(s, bench_shape(s, args.repeats)) for s in shapes]
    names = list(rows[0][1])
    print("| [B, H, T, D] | " + " | ".join(f"{n} ms" for n in names) + " | max rel. error |")
    print("|---|" + "---:|" * len(names) + "---:|")
    for shape, res in rows:
        cells = " | ".join(f"{res[n][0]:.2f}" for n in names)
        worst = max(e for n, (_, e) in res.items() if n != "SDPA")
        print(f"| [{', '.join(map(str, shape))}] | {cells} | {worst:.1e} |")


if __name__ == "__main__":
    main()
