"""Batch-1 decode with the KV cache in huge pages vs in 4 KB pages (models/kv_cache.py), same process,
alternating rounds: tok/s of each and the per-round ratio.

    python scripts/kv_huge_pages_ab.py MODEL PROMPT_TOKENS [RECIPE] [--rounds 7]
        e.g. /tmp/h17/smollm2-Q4_0.gguf 3000 kv-fp16
"""

from __future__ import annotations

import argparse
import statistics

import torch

import leanformer as lf
from leanformer.compress import apply, load_recipe
from leanformer.measure.bench.paired import decode_tok_s
from leanformer.models import kv_cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("prompt_tokens", type=int)
    p.add_argument("recipe", nargs="?", default="none")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = lf.load(a.model)
    if a.recipe != "none":
        model = apply(model, load_recipe(a.recipe))
    real = kv_cache.huge_zeros

    def speed(huge: bool) -> float:
        kv_cache.huge_zeros = real if huge else (lambda *args, **kwargs: None)
        try:
            with torch.inference_mode():
                return decode_tok_s(model, 1, a.prompt_tokens, 32)
        finally:
            kv_cache.huge_zeros = real

    speed(True), speed(False)  # warm-up
    huge, small = [], []
    for r in range(a.rounds):
        for h in (True, False) if r % 2 else (False, True):
            (huge if h else small).append(speed(h))
    ratios = [x / y for x, y in zip(huge, small)]
    print(
        f"prompt {a.prompt_tokens}: KV in huge pages {statistics.median(huge):.1f} tok/s, 4 KB pages "
        f"{statistics.median(small):.1f}; per round {statistics.median(ratios):.3f}x "
        f"({min(ratios):.3f}-{max(ratios):.3f}, {a.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
