"""Decode with the KV cache in huge pages vs in 4 KB pages, same process, alternating rounds: tok/s of
each and the per-round ratio.

    python scripts/kv_huge_pages_ab.py MODEL PROMPT_TOKENS [RECIPE] [--rounds 7] [--threads 2]
        [--paged [--rows 4] [--block-size 16]]
        e.g. /tmp/h17/smollm2-Q4_0.gguf 3000 kv-fp16

Default: batch 1 on the slot cache (models/kv_cache.py), 32 new tokens after the prompt. `--paged`: the
server's paged cache (models/paged_cache.py): each round fills a fresh cache with ROWS prompts of random
tokens, their blocks scattered over the pool in a shuffled order (as a server's pool ends up after
requests come and go), then times 32 one-token steps of all rows (the fused C++ step reading the pools in
place). Prints /proc/loadavg before and after.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import leanformer as lf
from leanformer.compress import apply, load_recipe
from leanformer.measure.bench.paired import decode_tok_s
from leanformer.models import kv_cache, paged_cache
from leanformer.models.paged_cache import PagedKVCache

STEPS = 32


def paged_tok_s(model, rows: int, prompt: int, block: int, g: torch.Generator) -> float:
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


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("prompt_tokens", type=int)
    p.add_argument("recipe", nargs="?", default="none")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paged", action="store_true", help="the server's paged cache, ROWS sequences")
    p.add_argument("--rows", type=int, default=4, help="--paged: sequences decoding together")
    p.add_argument("--block-size", type=int, default=16, help="--paged: tokens per block")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = lf.load(a.model)
    if a.recipe != "none":
        model = apply(model, load_recipe(a.recipe))
    where = paged_cache if a.paged else kv_cache  # the module whose huge_zeros the cache calls
    real = where.huge_zeros
    g = torch.Generator().manual_seed(0)

    def speed(huge: bool) -> float:
        where.huge_zeros = real if huge else (lambda *args, **kwargs: None)
        try:
            with torch.inference_mode():
                if a.paged:
                    return paged_tok_s(model, a.rows, a.prompt_tokens, a.block_size, g)
                return decode_tok_s(model, 1, a.prompt_tokens, STEPS)
        finally:
            where.huge_zeros = real

    before = loadavg()
    speed(True), speed(False)  # warm-up
    huge, small = [], []
    for r in range(a.rounds):
        for h in (True, False) if r % 2 else (False, True):
            (huge if h else small).append(speed(h))
    ratios = [x / y for x, y in zip(huge, small)]
    shape = f"{a.rows} rows, paged (blocks of {a.block_size})" if a.paged else "1 row"
    print(f"loadavg before {before}, after {loadavg()}")
    print(
        f"{shape}, prompt {a.prompt_tokens}: KV in huge pages {statistics.median(huge):.1f} tok/s, 4 KB pages "
        f"{statistics.median(small):.1f}; per round {statistics.median(ratios):.3f}x "
        f"({min(ratios):.3f}-{max(ratios):.3f}, {a.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
