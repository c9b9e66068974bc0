"""Paired decode-speed ratios: compressed variants against the uncompressed model, in one process.

`leanformer bench --recipe ...` also lets its rows take turns round by round (turns.py), each in its own
process for peak RSS; this runs every variant in the same process (one load, deep copies), in rotating
order, and reports the median over rounds of each variant's speed divided by the first variant's speed
*in the same round*, with the ceiling measured each round.

    python -m leanformer.measure.bench.paired smollm2 --recipe none int8+head-int8 int4-g32-dq8+head-int8 \\
        --batch 1 8 --rounds 7
    python -m leanformer.measure.bench.paired /tmp/h17/smollm2-Q4_0.gguf --keep-quantized \\
        --recipe none kv-fp16 kv-int8 --batch 1 8 --new-tokens 64
    python -m leanformer.measure.bench.paired smollm2 --recipe none bf16+head-bf16 --isa avx2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm


def decode_tok_s(model, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """batch / the median of the timed decode steps of one generation, as `leanformer bench` measures
    decode (a stalled step moves a median, not the figure; (t_N − t_1) / (N − 1) doubled one here)."""
    from leanformer.measure.bench.runner import decode_rate, leanformer_decode_steps

    g = torch.Generator().manual_seed(batch)
    vocab = model.args.vocab_size
    ids = torch.randint(vocab // 8, vocab - vocab // 8, (batch, prompt_tokens), generator=g).tolist()
    return decode_rate([leanformer_decode_steps(model, ids, max(new_tokens, 2))], batch)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument(
        "--recipe", nargs="+", default=["none"], help="'none' = uncompressed; the first is the base"
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--keep-quantized", action="store_true", help="a GGUF's block-quantized tensors stay quantized"
    )
    p.add_argument(
        "--isa", choices=["avx2", "avx512"], help="the GEMV kernels' instruction set (default: the best)"
    )
    p.add_argument("--json")
    args = p.parse_args(argv)

    from leanformer import kernels
    from leanformer.compress import apply, load_recipe
    from leanformer.errors import LeanformerError
    from leanformer.hub import resolve_model
    from leanformer.loading import load

    if args.isa:
        try:
            kernels.set_isa(args.isa)
        except ValueError as e:
            raise LeanformerError(str(e)) from None

    recipes = {
        name: None if name == "none" else load_recipe(name) for name in args.recipe
    }  # bad names fail first
    base, _ = load(resolve_model(args.model), keep_quantized=args.keep_quantized)
    variants = {}
    for name in args.recipe:
        model = base if recipes[name] is None else apply(copy.deepcopy(base), recipes[name])
        variants[name] = model
    from leanformer.measure.bench.runner import _nbytes, bandwidth_ceiling_tok_s

    speeds = {(n, b): [] for n in variants for b in args.batch}
    # the first recipe's batch-1 bandwidth ceiling (its weights' bytes: a bf16 model streams half of the
    # fp32 base's), memory speed measured once per round
    first_bytes = _nbytes(variants[args.recipe[0]])
    ceilings: list[float] = []
    with torch.inference_mode():
        for model in variants.values():  # warm-up: kernels, caches, decode plans
            decode_tok_s(model, 1, 16, 4)
        order = list(variants)
        for r in tqdm(range(args.rounds), desc="rounds"):
            ceilings.append(bandwidth_ceiling_tok_s(first_bytes, 3))
            for b in args.batch:
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    speeds[name, b].append(
                        decode_tok_s(variants[name], b, args.prompt_tokens, args.new_tokens)
                    )
    first = args.recipe[0]
    rows = []
    for b in args.batch:
        for name in variants:
            ratios = [s / f for s, f in zip(speeds[name, b], speeds[first, b])]
            rows.append(
                {"recipe": name, "batch": b, "tok_s": statistics.median(speeds[name, b]),
                 "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
            )  # fmt: skip
    print(f"{'recipe':28s} {'batch':>5s} {'tok/s':>8s} {'× ' + first:>12s}  (min–max over rounds)")
    for row in rows:
        print(
            f"{row['recipe']:28s} {row['batch']:5d} {row['tok_s']:8.1f} {row['ratio']:11.2f}×"
            f"  ({row['ratio_min']:.2f}–{row['ratio_max']:.2f})"
        )
    if 1 in args.batch:
        pct = [100 * s / c for s, c in zip(speeds[first, 1], ceilings)]
        print(
            f"{first} at batch 1: {statistics.median(pct):.0f}% of the memory-bandwidth ceiling measured each round"
        )
    result = {"config": vars(args), "rows": rows, "speeds": {f"{n}|b{b}": v for (n, b), v in speeds.items()}}
    result["ceiling_tok_s"], result["ceiling_bytes"] = ceilings, first_bytes
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    from leanformer.errors import LeanformerError

    try:
        main()
    except LeanformerError as e:  # one line, as the `leanformer` command prints them
        sys.exit(f"error: {e}")
