"""Benchmark the GEMV kernels against torch's CPU paths on a SmolLM2-135M decode step.

    python -m leanformer.kernels.bench [--rows 1 8] [--repeats 7] [--threads 2] [--isa avx2 avx512]

A "chain" is the 121 matmuls of one decode step: 30 layers x [qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536] + lm_head 49152x576 (134.5 M weights). Variants ending in "i8-x" quantize the
activations to int8 per block of 32 (gemv_i8.cpp); "sym" is GGUF Q4_0's symmetric int4 (no zeros). Every variant is timed in alternating rounds in
one process, so machine noise hits all of them alike; the table reports medians. The leanformer
variants run once per instruction set in --isa (default: every one this CPU has).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from leanformer.kernels import available, ext, isas, pack_int4, set_isa
from leanformer.kernels.modules import FastLinear
from leanformer.kernels.packed import PackedLinear

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
Chain = list[Callable[[], torch.Tensor]]


def shapes(layers: int = 30) -> list[tuple[int, int]]:
    return LAYER * layers + [(49152, 576)]


def _time_chain(chain: Chain) -> float:
    t = time.perf_counter()
    for f in chain:
        f()
    return (time.perf_counter() - t) * 1e3


def build_variants(m: int, layers: int, groups: tuple[int, ...]) -> dict[str, Chain]:
    """Name -> list of closures, one per matrix, each computing x [m, K] @ W^T in its own format."""
    g = torch.Generator().manual_seed(0)
    e = ext()
    v: dict[str, Chain] = {k: [] for k in ("f32 F.linear", "f32 oneDNN packed", "f32 leanformer")}
    v |= {"int8 torch bf16-x": [], "int8 torch fp32-x": [], "int8 leanformer": []}
    for gs in groups:
        v |= {f"int4 g{gs} torch bf16-x": [], f"int4 g{gs} leanformer": []}
    for n, k in shapes(layers):
        w = torch.randn(n, k, generator=g) / k**0.5
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        pw = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        v["f32 F.linear"].append(lambda x=x, w=w: F.linear(x, w))
        v["f32 oneDNN packed"].append(
            lambda x=x, pw=pw: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
        )
        v["f32 leanformer"].append(lambda x=x, w=w, e=e: e.linear_f32(x, w, None))
        s8 = w.abs().amax(1) / 127
        q8 = torch.round(w / s8[:, None]).to(torch.int8)
        sb = s8.bfloat16()
        v["int8 torch bf16-x"].append(
            lambda xb=xb, q8=q8, sb=sb: torch.ops.aten._weight_int8pack_mm(xb, q8, sb)
        )
        v["int8 torch fp32-x"].append(lambda x=x, q8=q8, s8=s8: torch.ops.aten._weight_int8pack_mm(x, q8, s8))
        v["int8 leanformer"].append(lambda x=x, q8=q8, s8=s8, e=e: e.linear_q8(x, q8, s8, None))
        for gs in groups:
            ng = -(-k // gs)  # torch's kernel needs K % gs == 0: pad K like compress/quant.py does
            codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
            sc, zc = torch.rand(n, ng, generator=g) * 0.01, torch.randn(n, ng, generator=g) * 0.01
            tp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                F.pad(codes, (0, ng * gs - k), value=8).int(), 2
            )
            sz = torch.stack([sc.t(), zc.t()], -1).bfloat16().contiguous()
            xp = F.pad(xb, (0, ng * gs - k))
            v[f"int4 g{gs} torch bf16-x"].append(
                lambda xp=xp, tp=tp, gs=gs, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(xp, tp, gs, sz)
            )
            wq = pack_int4(codes)
            v[f"int4 g{gs} leanformer"].append(
                lambda x=x, wq=wq, sc=sc, zc=zc, gs=gs, e=e: e.linear_q4(x, wq, sc, zc, gs, None)
            )
            # int8 activations (gemv_i8.cpp) need codes of whole groups: padded like the fused step's k_padded
            wp = pack_int4(F.pad(codes, (0, ng * gs - k), value=8))
            v.setdefault(f"int4 g{gs} leanformer i8-x", []).append(
                lambda x=x, wp=wp, sc=sc, zc=zc, gs=gs, e=e: e.linear_q4_i8(x, wp, sc, zc, gs, None)
            )
        # GGUF Q4_0 / Q8_0 as they load: symmetric int4 (no zeros read) and int8, scales per 32 columns
        c4, s32 = (
            pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)),
            s8[:, None].repeat(1, k // 32),
        )
        v.setdefault("int4 g32 sym leanformer i8-x", []).append(
            lambda x=x, c4=c4, s32=s32, e=e: e.linear_q4_i8(x, c4, s32, None, 32, None)
        )
        v.setdefault("int8 g32 leanformer i8-x", []).append(
            lambda x=x, q8=q8, s32=s32, e=e: e.linear_q8_i8(x, q8, s32, None, 32)
        )
    return v


def run_chains(
    m: int, repeats: int, layers: int, groups: tuple[int, ...], skip: set[str], isa_list: list[str]
) -> dict[str, float]:
    variants: dict[str, tuple[str | None, Chain]] = {}
    for name, chain in build_variants(m, layers, groups).items():
        if name in skip:
            continue
        if "leanformer" not in name:
            variants[name] = (None, chain)
        for isa in isa_list if "leanformer" in name else []:
            variants[f"{name} {isa}"] = (isa, chain)
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(repeats + 1):  # round 0 warms up: first-touch pages, oneDNN primitive caches
            for name, (isa, chain) in variants.items():
                if isa:
                    set_isa(isa)
                times[name].append(_time_chain(chain))
    finally:
        set_isa(None)
    return {k: statistics.median(t[1:]) for k, t in times.items()}


def overhead_us(calls: int = 2000) -> dict[str, float]:
    """Per-call cost at 64x64 (weights in L1): dispatch + output allocation + threading decision."""
    x, w = torch.randn(1, 64), torch.randn(64, 64)
    pw = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    q8, s8 = torch.randint(-127, 128, (64, 64), dtype=torch.int8), torch.rand(64)
    wq, sc, zc = torch.randint(0, 256, (64, 32), dtype=torch.uint8), torch.rand(64, 1), torch.rand(64, 1)
    e = ext()
    packed_mod = PackedLinear.from_linear(torch.nn.Linear(64, 64, bias=False))
    fast_mod = FastLinear.from_linear(torch.nn.Linear(64, 64, bias=False))
    fns = {
        "f32 F.linear": lambda: F.linear(x, w),
        "f32 oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""),
        "f32 leanformer": lambda: e.linear_f32(x, w, None),
        "int8 leanformer": lambda: e.linear_q8(x, q8, s8, None),
        "int4 g64 leanformer": lambda: e.linear_q4(x, wq, sc, zc, 64, None),
        "module PackedLinear": lambda: packed_mod(x),
        "module FastLinear": lambda: fast_mod(x),
    }
    with torch.inference_mode():
        return _time_calls(fns, calls)


def _time_calls(fns: dict[str, Callable[[], torch.Tensor]], calls: int) -> dict[str, float]:
    out = {}
    for name, f in fns.items():
        for _ in range(200):
            f()
        reps = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                f()
            reps.append((time.perf_counter() - t) / calls * 1e6)
        out[name] = statistics.median(reps)
    return out


def weight_mb(name: str, layers: int) -> float:
    n_w = sum(n * k for n, k in shapes(layers))
    n_rows = sum(n for n, _ in shapes(layers))
    if name.startswith("f32"):
        return n_w * 4 / 1e6
    if name.startswith("int8 g32"):
        return (n_w + n_w // 32 * 4) / 1e6  # codes + an fp32 scale per 32
    if name.startswith("int8"):
        return (n_w + 4 * n_rows) / 1e6
    gs = int(name.split()[1][1:])
    n_groups = sum(n * -(-k // gs) for n, k in shapes(layers))
    per_group = 4 if " sym " in name else 8  # fp32 scale (& zero) per group
    return (n_w / 2 + n_groups * per_group) / 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    p.add_argument("--skip", nargs="*", default=[], help="variant names to leave out")
    p.add_argument("--isa", nargs="+", default=None, help="instruction sets for the leanformer kernels")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not available():
        raise SystemExit("kernels unavailable on this machine")
    isa_list = a.isa or isas()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )
    for m in a.rows:
        res = run_chains(m, a.repeats, a.layers, tuple(a.groups), set(a.skip), isa_list)
        base = res.get("f32 oneDNN packed", next(iter(res.values())))
        print(f"\nM={m}: {a.layers}-layer SmolLM2-135M chain, median of {a.repeats}")
        print(f"| {'variant':34} | {'ms':>7} | {'GB/s':>6} | {'vs oneDNN f32':>13} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 8}|{'-' * 15}|")
        for name, ms in res.items():
            gbs = weight_mb(name, a.layers) / ms
            print(f"| {name:34} | {ms:7.2f} | {gbs:6.1f} | {base / ms:12.2f}x |")
    print("\nper-call overhead at 64x64, M=1 (µs):")
    for name, us in overhead_us().items():
        print(f"  {name:24} {us:6.1f}")


if __name__ == "__main__":
    main()
