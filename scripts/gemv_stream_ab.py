"""One quantized GEMV (batch 1) per kernel build, streamed from memory: GB/s of weights and scales.

    python scripts/gemv_stream_ab.py OLD.so [NEW.so ...] [--k 576 1536] [--mb 66] [--threads 2]
        [--weights q4|q8|q8row|q4f|f32] [--act-isa avx2] [--rounds 11] [--huge-pages] [--copies N]

For each K: one weight matrix of about `--mb` MB (rows = MB / row bytes, int4 group 32 with fp32 scales
as SmolLM2's Q4_0 blocks load, int8 group 32, int8 with one scale per row, `q4f`: the int4 matrix
through the fp32-activation kernel, linear_q4, or `f32`: fp32 weights, linear_f32), larger than the
caches, so every call streams it from memory (`--mb 0.75`: L2-resident, the kernel's compute rate;
`--mb 0.166 --copies 400`: 400 layer-sized matrices in turn, each call a fresh stream). The builds
alternate call by call in one process (each round: every K, every build, in reversed order every other
round), a `torch.sum` over as many
bytes first in each round; prints each build's median GB/s, the median per-round ratio to the first
build and to the sum. Builds: kernel libraries as scripts/i8_rows_ab.py loads them (the .so under
~/.cache/leanformer/kernels/<tag>/).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from i8_rows_ab import load_so  # same directory: run as a script

from leanformer.kernels import pack_int4


def weights(kind: str, k: int, mb: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    row = {"q4": k // 2 + k // 32 * 4, "q4f": k // 2 + k // 32 * 8, "q8": k + k // 32 * 4, "q8row": k + 4}
    row = row | {"f32": 4 * k}
    row = row[kind]
    n = max(64, int(mb * 2**20) // row // 64 * 64)
    if kind == "f32":
        return (torch.randn(n, k, generator=g),)
    if kind in ("q4", "q4f"):
        codes = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g))
        scales = torch.rand(n, k // 32, generator=g) * 0.01
        return (
            (codes, scales) if kind == "q4" else (codes, scales, -8 * scales)
        )  # linear_q4 takes zero points
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return codes, torch.rand(n, k // 32, generator=g) * 0.01 if kind == "q8" else torch.rand(
        n, generator=g
    ) * 0.01


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    from leanformer.models.huge_pages import huge_empty

    block = huge_empty(t.numel() * t.element_size())
    assert block is not None, "no transparent huge pages here"
    return block.view(t.dtype).view(t.shape).copy_(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("builds", nargs="+")
    p.add_argument("--k", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--mb", type=float, default=66.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", choices=("q4", "q8", "q8row", "q4f", "f32"), default="q4")
    p.add_argument("--act-isa", default=None, help="avx2 / avx_vnni / avx512_vnni (default: the CPU's best)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--huge-pages", action="store_true", help="weights and the sum's buffer in huge pages")
    p.add_argument(
        "--copies",
        type=int,
        default=1,
        help="N distinct matrices of --mb each, called in turn and timed together: every call a fresh "
        "stream, as a decode step's layer-sized GEMVs are (e.g. --mb 0.166 --copies 400)",
    )
    a = p.parse_args()
    if min(a.k) < 1 or not a.mb > 0 or a.threads < 1 or a.copies < 1 or a.rounds < 1:
        p.error("--k, --mb, --threads, --copies and --rounds must be positive")
    torch.set_num_threads(a.threads)
    mods = [load_so(b) for b in a.builds]
    if a.act_isa:
        for m in mods:
            m.set_act_isa(a.act_isa)
    g = torch.Generator().manual_seed(0)
    mats = {k: [weights(a.weights, k, a.mb, g) for _ in range(a.copies)] for k in a.k}
    if a.huge_pages:
        mats = {k: [tuple(huge_copy(t) for t in ts) for ts in copies] for k, copies in mats.items()}
    group = 0 if a.weights == "q8row" else 32

    def call(m, k: int) -> None:
        x = xs[k]
        for codes, *rest in mats[k]:
            scales, *zeros = rest or [None]
            if a.weights == "q4":
                m.linear_q4_i8(x, codes, scales, None, group, None)
            elif a.weights == "f32":
                m.linear_f32(x, codes, None)
            elif a.weights == "q4f":
                m.linear_q4(x, codes, scales, zeros[0], group, None, None)
            else:
                m.linear_q8_i8(x, codes, scales, None, group)

    def seconds(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    xs = {k: torch.randn(1, k, generator=g) for k in a.k}
    nbytes = {k: sum(t.numel() * t.element_size() for ts in mats[k] for t in ts) for k in a.k}
    buf = {k: torch.randn(nbytes[k] // 4) for k in a.k}
    if a.huge_pages:
        buf = {k: huge_copy(b) for k, b in buf.items()}
    t: dict[tuple[int, int], list[float]] = {}
    for r in range(a.rounds):
        for k in a.k:
            t.setdefault((k, -1), []).append(seconds(buf[k].sum))
            # the builds' order reversed every other round: the build called right after the sum read
            # up to 1.14x slower in every pairing (session 24), a bias the reversal cancels
            for i in range(len(mods)) if r % 2 == 0 else reversed(range(len(mods))):
                t.setdefault((k, i), []).append(seconds(lambda m=mods[i], k=k: call(m, k)))
    print(
        f"{a.weights}, {a.threads} threads, ~{a.mb} MB per matrix x {a.copies}, act isa {mods[0].act_isa()}"
    )
    print("| K | build | GB/s | / first build (paired) | / torch.sum (paired) |")
    print("|---|---|---|---|---|")
    for k in a.k:
        for i, b in enumerate(a.builds):
            ts = t[(k, i)]
            first = statistics.median(x / y for x, y in zip(ts, t[(k, 0)]))
            to_sum = statistics.median(s / x for x, s in zip(ts, t[(k, -1)]))
            gbs = nbytes[k] / statistics.median(ts) / 1e9
            print(f"| {k} | {b.split('/')[-2]} | {gbs:.1f} | {first:.2f}× time | {to_sum:.2f}× |")


if __name__ == "__main__":
    main()
