"""The engine loop with and without the ids-to-logits C++ call (fused.py run_tokens), in ONE process
(issue #17; BENCHMARKS session 12).

    python scripts/tokens_path_ab.py MODEL.gguf [--rounds 15] [--threads 2] [--new-tokens 48]

Greedy decoding of 128-token random prompts at batch 1 and 8 through leanformer's engine, rounds
alternating which path goes first; prints each path's median seconds per step and the per-round ratio.
"""

from __future__ import annotations

import statistics

import torch
from engine_ab import setup  # same directory: run as a script


def main() -> None:
    a, model = setup(__doc__)
    from leanformer.measure.bench.runner import leanformer_decode_steps
    from leanformer.models import fused

    on = fused.DecodePlan.usable_tokens
    off = staticmethod(lambda *args: False)
    res: dict[tuple[int, str], list[float]] = {}
    for r in range(a.rounds):
        for b in (1, 8):
            ids = torch.randint(1000, 40000, (b, 128), generator=torch.Generator().manual_seed(r)).tolist()
            for name in ("new", "old") if r % 2 else ("old", "new"):
                fused.DecodePlan.usable_tokens = on if name == "new" else off
                with torch.inference_mode():
                    steps = leanformer_decode_steps(model, ids, a.new_tokens)
                res.setdefault((b, name), []).append(statistics.median(steps))
    fused.DecodePlan.usable_tokens = on
    for b in (1, 8):
        ratios = [n / o for n, o in zip(res[(b, "new")], res[(b, "old")])]
        o, n = statistics.median(res[(b, "old")]), statistics.median(res[(b, "new")])
        print(
            f"batch {b}: layers only {o * 1e3:.2f} ms, ids to logits {n * 1e3:.2f} ms per step; "
            f"ratio per round {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
