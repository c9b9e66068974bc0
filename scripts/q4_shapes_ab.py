"""Two builds of the kernel extension in ONE process: int4 int8-activation GEMV time per weight row at M
activation rows and several K (issue #17; docs/BENCHMARKS.md session 12).

    python scripts/q4_shapes_ab.py OLD.so NEW.so [--rows 1 4 8] [--k 576 1536] [--rounds 7] [--group 32]

Every shape does the same MACs (N = 576 * 1536 * 2 / K rows, 4 random matrices of ~1.8 MB each, GGUF
Q4_0-like symmetric codes); one thread, its CPU time, medians of 9 calls per round, rounds interleaved
old / new. Prints ns per weight row and new / old.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from i8_rows_ab import load_so  # same directory: run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--k", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--group", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    from leanformer.kernels import cpu

    print(f"CPU: {cpu.cpu_info()['model']}")  # figures name the CPU they come from
    exts = {"old": load_so(a.old), "new": load_so(a.new)}
    g = torch.Generator().manual_seed(0)
    res: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(a.rounds):
        for m in a.rows:
            for k in a.k:
                n = 576 * 1536 * 2 // k
                mats = [
                    (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                     torch.rand(n, k // a.group, generator=g) * 0.02)
                    for _ in range(4)
                ]  # fmt: skip
                x = torch.randn(m, k, generator=g)
                for name, e in exts.items():

                    def call(e=e, mats=mats, x=x):
                        for w, s in mats:
                            e.linear_q4_i8(x, w, s, None, a.group, None)

                    call()
                    ts = []
                    for _ in range(9):
                        t = time.thread_time()
                        call()
                        ts.append(time.thread_time() - t)
                    res.setdefault((m, k, name), []).append(statistics.median(ts) / 4 / n * 1e9)
    print("| rows M | K | old ns/row | new ns/row | new / old |")
    print("|---|---|---|---|---|")
    for m in a.rows:
        for k in a.k:
            o, nw = (statistics.median(res[(m, k, v)]) for v in ("old", "new"))
            print(f"| {m} | {k} | {o:.1f} | {nw:.1f} | {nw / o:.3f} |")


if __name__ == "__main__":
    main()
