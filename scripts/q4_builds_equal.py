"""Two kernel builds give the same int4 int8-activation GEMV bit for bit (a kernel change meant to keep results).

    python scripts/q4_builds_equal.py OLD.so NEW.so

`linear_q4_i8` over group-32 shapes that take each path of the AVX-512 VNNI loops (whole 512-column spans,
an odd 64-column chunk after them, a last 32 columns, spans only, none), 1-16 activation rows, symmetric
codes (GGUF Q4_0), fp32 zero points, zero points fp16 holds (GGUF Q4_1's mins) and 8-bit scale / zero
codes with their table, fp32 or fp16 scales, with and without a bias. Exits 1 at the first difference. Builds: as scripts/i8_rows_ab.py loads them.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from i8_rows_ab import load_so  # same directory: run as a script

from leanformer.compress import double_quant as DQ

SHAPES = [
    (67, 512),
    (67, 576),
    (45, 1024),
    (40, 1536),
    (33, 1600),
    (33, 1120),
    (13, 1088),
    (9, 4160),
    (21, 320),
]


def operands(n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.rand(n, k // 32, generator=g) * 4.6 - 2.3) * 1e-2
    zeros = (torch.rand(n, k // 32, generator=g) * 15 - 7) * scales
    sc, zc, ranges = DQ.encode(scales, zeros)
    s, z = DQ.decode(sc, zc, ranges)
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    return codes, sc, zc, DQ.lut(ranges), s.contiguous(), z.contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    a = p.parse_args()
    old, new = load_so(a.old), load_so(a.new)
    cases = 0
    for (n, k), rows, mode, half, bias in itertools.product(
        SHAPES,
        [1, 2, 3, 4, 5, 8, 9, 16],
        ["symmetric", "zeros", "zeros16", "coded"],
        [False, True],
        [False, True],
    ):
        if mode == "coded" and half:
            continue  # fp16 scale copies are made from fp32 scales only
        codes, sc, zc, lut, s, z = operands(n, k, n + k)
        if half:
            s = s.half().float()  # values fp16 holds exactly
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        b = torch.randn(n) if bias else None
        ops = {"symmetric": (s, None, None), "zeros": (s, z, None), "zeros16": (s, z.half().float(), None)}
        ops = ops.get(mode, (sc, zc, lut))
        y0, y1 = (e.linear_q4_i8(x, codes, ops[0], ops[1], 32, b, ops[2], half) for e in (old, new))
        if not torch.equal(y0, y1):
            print(
                f"differ: n={n} k={k} rows={rows} {mode} half={half} bias={bias}: {(y0 - y1).abs().max():.3g}"
            )
            sys.exit(1)
        cases += 1
    print(f"bit-equal in {cases} cases (int8-activation ISA {new.act_isa()})")


if __name__ == "__main__":
    main()
