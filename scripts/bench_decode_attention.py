"""The fused decode step's attention alone, on SmolLM2-135M's attention shape (9 query heads, 3 KV heads,
head_dim 64, 30 layers) with tiny fp32 Linears (hidden 64), so a step's time is ~all attention (RoPE,
cache write, scores, softmax, P.V) over a KV cache of the real size (30 layers, fp32 or int8).

    OMP_NUM_THREADS=1 python scripts/bench_decode_attention.py [--threads 1] [--kv fp32|int8] [--repeats 25]

Prints the median ms per step for 1 row, 3 and 8 chained rows of one slot (a verify forward) and 8
batched rows (8 slots), at positions 200 and 1000: thread CPU time at 1 thread (a busy machine's
preemption does not inflate it), wall time otherwise. Compare trees by running it with PYTHONPATH set to
each tree's src, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leanformer import kernels as K

H, KV, D, HIDDEN, LAYERS = 9, 3, 64, 64, 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--repeats", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    e, g = K.ext(), torch.Generator().manual_seed(0)

    def lin(n: int, k: int):
        return e.DecodeLinear("f32", torch.randn(n, k, generator=g) * 0.05, None, None, None, None, 0, 0)

    stack = e.DecodeStack()
    for _ in range(LAYERS):
        stack.add(torch.ones(HIDDEN), 1e-5, lin((H + 2 * KV) * D, HIDDEN), lin(HIDDEN, H * D), torch.ones(HIDDEN),
                  1e-5, lin(64, HIDDEN), lin(HIDDEN, 32), H, KV, D)  # fmt: skip
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    out = []
    for pos0 in (200, 1000):
        for rows, kind in ((1, "row"), (3, "chained"), (8, "chained"), (8, "batched")):
            shape = (rows if kind == "batched" else 1, KV, pos0 + 16, D)
            if a.kv == "int8":
                k = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for _ in range(LAYERS)]
                v = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for _ in range(LAYERS)]
                ks = [torch.rand(*shape[:3], 1, generator=g) * 0.01 for _ in range(LAYERS)]
                vs = [torch.rand(*shape[:3], 1, generator=g) * 0.01 for _ in range(LAYERS)]
            else:
                k = [torch.randn(shape, generator=g) for _ in range(LAYERS)]
                v = [torch.randn(shape, generator=g) for _ in range(LAYERS)]
                ks = vs = []
            x, cos, sin = torch.randn(rows, HIDDEN, generator=g), torch.ones(rows, D), torch.zeros(rows, D)
            if kind == "batched":
                slots, pos = torch.arange(rows), torch.full((rows,), pos0)
            else:
                slots, pos = torch.zeros(rows, dtype=torch.long), pos0 + torch.arange(rows)
            times = []
            for _ in range(a.repeats + 3):
                t = clock()
                stack.forward(x, cos, sin, k, v, ks, vs, slots, pos)
                times.append(clock() - t)
            out.append(f"pos {pos0} {rows} {kind}: {statistics.median(times[3:]) * 1e3:.3f} ms")
    print(f"threads {a.threads}, KV {a.kv}: " + "; ".join(out))


if __name__ == "__main__":
    main()
