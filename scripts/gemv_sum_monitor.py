"""How the fp32 GEMV tracks the memory's rate as the host's rate swings: pairs of (2-thread torch.sum over
a huge-page buffer, linear_f32 over a huge-page matrix of as many bytes), back to back for a while, then
their medians and ratio binned by the sum's rate (this VM's memory runs at ~35 GB/s or at 55-68 GB/s for
minutes at a time: docs/BENCHMARKS.md session 23).

    python scripts/gemv_sum_monitor.py [--seconds 60] [--k 576] [--mb 512] [--split 45]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gemv_stream_ab import huge_copy  # same directory: run as a script

from leanformer.kernels import ext
from leanformer.measure.bench.turns import sum_buffer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--k", type=int, default=576, help="the matrix's columns")
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--split", type=float, default=45.0, help="GB/s of the sum between 'calm' and 'fast'")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.seconds <= 0 or a.k < 1 or a.mb < 1 or a.threads < 1:
        p.error("--seconds, --k, --mb and --threads must be positive")
    torch.set_num_threads(a.threads)
    buf = sum_buffer(a.mb << 20)
    w = huge_copy(torch.randn((a.mb << 20) // (4 * a.k), a.k))
    x, e = torch.randn(1, a.k), ext()
    buf.sum(), e.linear_f32(x, w, None)
    pairs: list[tuple[float, float]] = []
    end = time.time() + a.seconds
    with torch.inference_mode():
        while time.time() < end:
            t = time.perf_counter()
            buf.sum()
            s = buf.numel() * 4 / (time.perf_counter() - t) / 1e9
            t = time.perf_counter()
            e.linear_f32(x, w, None)
            pairs.append((s, w.numel() * 4 / (time.perf_counter() - t) / 1e9))
    print(f"K {a.k}, {a.mb} MB, {a.threads} threads, {len(pairs)} pairs")
    print("| memory | pairs | sum GB/s | linear_f32 GB/s | ratio (median per pair) |")
    print("|---|---|---|---|---|")
    for name, sel in (
        ("calm", [q for q in pairs if q[0] < a.split]),
        ("fast", [q for q in pairs if q[0] >= a.split]),
    ):
        if sel:
            s, g = statistics.median(q[0] for q in sel), statistics.median(q[1] for q in sel)
            ratio = statistics.median(q[1] / q[0] for q in sel)
            print(f"| {name} | {len(sel)} | {s:.1f} | {g:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
