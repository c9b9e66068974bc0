"""The engine loop with the per-step checks (decode's default) and with them done once for the loop
(fixed_model=True, models/fused_steps.py, as generate runs it), in ONE process (issue #17; BENCHMARKS
session 13).

    python scripts/fixed_model_ab.py MODEL.gguf [--rounds 15] [--threads 2] [--new-tokens 48]

Greedy decoding of 128-token random prompts at batch 1 and 8, rounds alternating which loop goes first;
prints each loop's median seconds per step and the per-round ratio, with the CPU.
"""

from __future__ import annotations

import statistics
import time

import torch
from engine_ab import setup  # same directory: run as a script


def main() -> None:
    a, model = setup(__doc__)
    from leanformer.engine.generate import decode
    from leanformer.engine.sampling import SamplingParams

    res: dict[tuple[int, bool], list[float]] = {}
    for r in range(a.rounds):
        for b in (1, 8):
            ids = torch.randint(1000, 40000, (b, 128), generator=torch.Generator().manual_seed(r)).tolist()
            outs = {}
            for fixed in (True, False) if r % 2 else (False, True):
                stamps, tokens = [], []
                for new in decode(model, ids, a.new_tokens, SamplingParams(), fixed_model=fixed):
                    stamps.append(time.perf_counter())
                    tokens.append(new)
                outs[fixed] = tokens
                steps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
                res.setdefault((b, fixed), []).append(statistics.median(steps))
            assert outs[True] == outs[False], "the two loops decoded different tokens"
    for b in (1, 8):
        ratios = [n / o for n, o in zip(res[(b, True)], res[(b, False)])]
        o, n = statistics.median(res[(b, False)]), statistics.median(res[(b, True)])
        print(
            f"batch {b}: checked each step {o * 1e3:.2f} ms, fixed model {n * 1e3:.2f} ms per step; "
            f"ratio per round {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
