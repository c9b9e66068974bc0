"""Batched decode on the paged KV cache (the server's, models/paged_cache.py) with its pools in huge pages
vs 4 KB pages, same process, alternating rounds: tok/s of each and the per-round ratio.

    python scripts/paged_huge_pages_ab.py MODEL [--prompt-tokens 1500] [--rows 4] [--recipe kv-fp16]
        [--rounds 7] [--threads 2]

Each round fills a fresh cache: ROWS prompts of PROMPT_TOKENS random tokens, their blocks scattered over
the pool in a shuffled order (as a server's pool ends up after requests come and go), then times 32
one-token steps of all rows (the fused C++ step reading the pools in place). Prints /proc/loadavg.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import leanformer as lf
from leanformer.compress import apply, load_recipe
from leanformer.models import paged_cache
from leanformer.models.paged_cache import PagedKVCache

STEPS = 32


def decode_tok_s(model, rows: int, prompt: int, block: int, g: torch.Generator) -> float:
    per_row = -(-(prompt + STEPS + 1) // block)
    cache = PagedKVCache.for_model(model, rows, per_row * block, rows * per_row, block)
    cache.block_tables[:, :per_row] = torch.randperm(rows * per_row, generator=g).view(rows, per_row)
    slots = torch.arange(rows)
    ids = torch.randint(0, model.args.vocab_size, (rows, prompt), generator=g)
    for s in range(rows):
        model(ids[s : s + 1], cache=cache, slots=slots[s : s + 1], logits_at=torch.tensor([prompt - 1]))
        cache.advance(slots[s : s + 1], prompt)
    step = ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(STEPS):
        logits = model(step, cache=cache, slots=slots)
        cache.advance(slots, 1)
        step = logits[:, -1].argmax(-1, keepdim=True)
    return rows * STEPS / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--recipe", default="none")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = lf.load(a.model)
    if a.recipe != "none":
        model = apply(model, load_recipe(a.recipe))
    real = paged_cache.huge_zeros
    g = torch.Generator().manual_seed(0)

    def speed(huge: bool) -> float:
        paged_cache.huge_zeros = real if huge else (lambda *args, **kwargs: None)
        try:
            with torch.inference_mode():
                return decode_tok_s(model, a.rows, a.prompt_tokens, a.block_size, g)
        finally:
            paged_cache.huge_zeros = real

    before = Path("/proc/loadavg").read_text().split()[:3]
    speed(True)  # warm-up: the fused step built, the kernels loaded
    runs: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for huge in (True, False) if r % 2 == 0 else (False, True):
            runs[huge].append(speed(huge))
    after = Path("/proc/loadavg").read_text().split()[:3]
    ratios = [h / s for h, s in zip(runs[True], runs[False])]
    print(
        f"{a.model}, recipe {a.recipe}, {a.rows} rows x {a.prompt_tokens} prompt tokens, blocks of {a.block_size}"
    )
    print(f"loadavg before {' '.join(before)}, after {' '.join(after)}")
    print(
        f"huge pages: {statistics.median(runs[True]):.1f} tok/s, 4 KB pages: {statistics.median(runs[False]):.1f}"
    )
    print(
        f"huge / 4 KB per round: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
