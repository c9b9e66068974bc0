"""Weights over 4 KB pages vs in huge pages (models/huge_pages.py), same process, alternating.

python scripts/huge_pages_ab.py gemv [--threads 2]
    one streamed GEMV (int4 with int8 activations, fp32) and a torch.sum, each over a copy of the same
    bytes in 4 KB pages and in a huge-page block: GB/s (median of 9 calls each)
python scripts/huge_pages_ab.py decode MODEL [--recipe kv-fp16] [--new-tokens 128] [--dequantize]
    MODEL loaded twice, one copy's weights moved into huge pages and one not, batch-1 decode tok/s in
    alternating rounds: the per-round ratio (median, range)
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from leanformer.models import huge_pages


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    block = huge_pages.huge_empty(t.numel() * t.element_size())
    assert block is not None, f"no transparent huge pages here (mode {huge_pages.thp_mode()})"
    return block.view(t.dtype).view(t.shape).copy_(t)


def gemv(threads: int) -> None:
    from leanformer.kernels import ext, pack_int4

    torch.set_num_threads(threads)
    e, g = ext(), torch.Generator().manual_seed(0)
    print(f"{threads} threads, THP mode {huge_pages.thp_mode()}")
    print("| K | what | 4 KB pages GB/s | huge pages GB/s |\n|---|---|---|---|")
    for k in (576, 1536):
        n = (100 << 20) // (k // 2 + k // 32 * 4) // 64 * 64
        codes = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g))
        scales = torch.rand(n, k // 32, generator=g) * 0.01
        w32 = torch.randn((200 << 20) // (4 * k), k, generator=g)
        x = torch.randn(1, k, generator=g)
        q4_bytes = codes.numel() + scales.numel() * 4
        buf = torch.randn(q4_bytes // 4)
        hc, hs, hw, hb = huge_copy(codes), huge_copy(scales), huge_copy(w32), huge_copy(buf)
        q4, f32 = partial(e.linear_q4_i8, x), partial(e.linear_f32, x)
        cases = {
            "int4 GEMV": (
                q4_bytes,
                partial(q4, codes, scales, None, 32, None),
                partial(q4, hc, hs, None, 32, None),
            ),
            "fp32 GEMV": (w32.numel() * 4, partial(f32, w32, None), partial(f32, hw, None)),
            "torch.sum": (q4_bytes, buf.sum, hb.sum),
        }
        times = {(c, i): [] for c in cases for i in (0, 1)}
        for _ in range(9):
            for c, (_, small, huge) in cases.items():
                for i, fn in enumerate((small, huge)):
                    t = time.perf_counter()
                    fn()
                    times[c, i].append(time.perf_counter() - t)
        for c, (nbytes, _, _) in cases.items():
            gbs = [nbytes / statistics.median(times[c, i]) / 1e9 for i in (0, 1)]
            print(f"| {k} | {c} | {gbs[0]:.1f} | {gbs[1]:.1f} |")


def decode(model_path: str, recipe: str | None, new_tokens: int, dequantize: bool, rounds: int) -> None:
    import leanformer as lf
    from leanformer.compress import apply, load_recipe
    from leanformer.measure.bench.paired import decode_tok_s

    def load():
        m, _ = lf.load(model_path, keep_quantized=not dequantize)
        return apply(m, load_recipe(recipe)) if recipe and recipe != "none" else m

    moved = load()
    real = huge_pages.huge_empty
    huge_pages.huge_empty = lambda nbytes: None  # the second copy stays in 4 KB pages
    try:
        plain = load()
        with torch.inference_mode():
            decode_tok_s(plain, 1, 16, 4)  # its decode plan built without moving anything
    finally:
        huge_pages.huge_empty = real
    assert getattr(moved, "_huge_pages", None) and not getattr(plain, "_huge_pages", None)
    speeds, ratios = ([], []), []
    for r in range(rounds):
        with torch.inference_mode():
            order = (moved, plain) if r % 2 else (plain, moved)
            got = {id(m): decode_tok_s(m, 1, 128, new_tokens) for m in order}
        speeds[0].append(got[id(moved)]), speeds[1].append(got[id(plain)])
        ratios.append(got[id(moved)] / got[id(plain)])
    print(
        f"huge pages {statistics.median(speeds[0]):.1f} tok/s, 4 KB pages {statistics.median(speeds[1]):.1f}; "
        f"per round {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}, {rounds} rounds)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gemv")
    g.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("decode")
    d.add_argument("model")
    d.add_argument("--recipe", default=None)
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--dequantize", action="store_true")
    d.add_argument("--rounds", type=int, default=9)
    d.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.what == "gemv":
        gemv(a.threads)
    else:
        torch.set_num_threads(a.threads)
        decode(a.model, a.recipe, a.new_tokens, a.dequantize, a.rounds)


if __name__ == "__main__":
    main()
