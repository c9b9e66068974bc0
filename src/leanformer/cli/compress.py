"""`leanformer compress`: apply a recipe, save the result, and show what it cost on one screen."""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import torch

from leanformer.cli import args as ck
from leanformer.cli.common import add_calibration_flags, check_calibration
from leanformer.errors import LeanformerError


def decode_speed(model, vocab: int, new_tokens: int = 32) -> float:
    """Batch-1 greedy decode tokens/s from the median of timed decode steps (robust to one slow step)."""
    from leanformer.measure.bench.runner import decode_rate, leanformer_decode_steps

    prompt = torch.randint(10, vocab, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    leanformer_decode_steps(model, [prompt], 4)  # warm-up
    return decode_rate([leanformer_decode_steps(model, [prompt], new_tokens) for _ in range(2)], 1)


def check_disk(output: str, nbytes: int) -> None:
    """One line before any work when the saved model (about `nbytes`) cannot fit the free space."""
    parent = Path(output).expanduser().resolve()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    need = int(nbytes * 1.05) + (16 << 20)  # + tokenizer / config files and filesystem slack
    if need > free:
        raise LeanformerError(
            f"the compressed model needs about {need / 2**20:.0f} MB but {parent} has {free / 2**20:.0f} MB "
            "free; free some space or choose another --output"
        )


def open_model(args, path: str, recipe) -> tuple:
    """(model, tokenizer, float size in bytes, streamed?): the model lazily (read layer by layer while
    it is compressed) where streaming can serve it, else whole; --stream / --in-memory force one."""
    import leanformer as lf
    from leanformer.compress.stream import compressed_bytes, plan_stages, state_bytes

    skeleton, why = None, None
    if not args.in_memory:
        try:
            skeleton, tok = lf.load(path, dtype=args.dtype, lazy=True)
            plan_stages(skeleton, recipe.stages)
        except LeanformerError as e:
            if args.stream:
                raise
            skeleton, why = None, str(e)
    if skeleton is not None:
        check_disk(args.output, compressed_bytes(skeleton, recipe.stages))
        return skeleton, tok, state_bytes(skeleton), True
    if why:
        print(f"compressing in memory: {why}", file=sys.stderr)
    model, tok = lf.load(path, dtype=args.dtype, keep_quantized=False)
    check_disk(args.output, state_bytes(model))  # an upper bound: no cheap estimate without a skeleton
    return model, tok, state_bytes(model), False


def cmd_compress(args) -> None:
    import leanformer as lf
    from leanformer.cli.common import print_table
    from leanformer.compress import apply, load_recipe
    from leanformer.compress.stream import state_bytes
    from leanformer.hub import resolve_model
    from leanformer.measure.bench.peer_worker import rss_mb
    from leanformer.measure.evaluate import evaluate, read_text, tokenize
    from leanformer.outputs import check_output_dir

    recipe = load_recipe(args.recipe)
    for stage in recipe.stages:  # a bad recipe file fails in one line before the model loads
        stage.validate()
    check_calibration([recipe], args.calibration)  # read only after compressing: checked now
    if args.eval_data and not Path(args.eval_data).expanduser().is_file():
        raise LeanformerError(f"--eval-data file not found: {args.eval_data}")
    path = resolve_model(args.model)
    # the output rules before minutes of loading and GPTQ: never the model's own folder, and only an
    # earlier leanformer save is replaced without --overwrite (outputs.py)
    check_output_dir(args.output, args.overwrite, inputs=[path])
    model, tok, before, streamed = open_model(args, path, recipe)
    compare = bool(args.eval_data) or not args.no_speed
    original = copy.deepcopy(model) if compare and not streamed else None
    calibration = None
    if args.calibration:
        from leanformer.measure.evaluate import calibration_ids

        calibration = calibration_ids(tok, args.calibration, args.calibration_samples, args.calibration_len)
    apply(model, recipe, calibration=calibration)
    out = lf.save(model, tok, args.output, overwrite=args.overwrite)
    peak = rss_mb()  # before any comparison loads the original again
    rows = [
        ("saved to", str(out)),
        ("weights before → after (MB)", f"{before / 2**20:.1f} → {state_bytes(model) / 2**20:.1f}"),
        (f"peak RSS {'layer by layer' if streamed else 'in memory'} (MB)", f"{peak:.0f}"),
    ]
    if compare and original is None:  # streamed: the float original only now, for the comparison
        original, _ = lf.load(path, dtype=args.dtype, keep_quantized=False)
    if args.eval_data:
        ids = tokenize(tok, read_text(args.eval_data, args.eval_chars))
        r = evaluate(model, ids, args.window, reference=original, progress=True)
        rows += [
            ("perplexity before → after", f"{r.reference_perplexity:.3f} → {r.perplexity:.3f} ({100 * (r.perplexity / r.reference_perplexity - 1):+.2f}%)"),
            ("mean KLD vs original", f"{r.kld:.5f}"),
            ("top-1 agreement", f"{r.top1_agreement:.1%}"),
        ]  # fmt: skip
    if not args.no_speed:
        vocab = model.args.vocab_size
        before, after = decode_speed(original, vocab), decode_speed(model, vocab)
        rows.append(
            (
                "decode tokens/s (batch 1) before → after",
                f"{before:.1f} → {after:.1f} ({after / before:.2f}×)",
            )
        )
    print_table(f"compress {args.model} with {args.recipe}", ["", "value"], rows)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="apply a compression recipe, save it, report size / quality / speed")
    p.add_argument("model")
    p.add_argument(
        "--recipe",
        required=True,
        help="recipe file (.json/.yaml) or preset: int8, int4, w8a8, gptq-int4, wanda-50, sparsegpt-2:4, ffn-33, ...",
    )
    p.add_argument("-o", "--output", required=True, help="output folder (reloads with leanformer.load)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace OUTPUT even when it is a non-empty folder that is not a leanformer save "
        "(never the model's own folder, a folder above it, the current or home folder)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_calibration_flags(p)
    p.add_argument("--eval-data", default=None, help="held-out text: report PPL and KLD vs the original")
    p.add_argument("--eval-chars", type=ck.positive_int, default=20_000)
    p.add_argument("--window", type=ck.int_range(2), default=512, help="eval window, at least 2 tokens")
    p.add_argument("--no-speed", action="store_true", help="skip the decode speed before/after")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--stream", action="store_true",
        help="read and compress one decoder layer at a time (the default where it can serve the model "
        "and recipe); fail in one line where it cannot",
    )  # fmt: skip
    how.add_argument(
        "--in-memory", action="store_true",
        help="load the whole float model first (needed for GPT-2 / BERT, pre-zip .bin pickles, PruneLayers and recipes with two calibrated stages)",
    )  # fmt: skip
    p.set_defaults(func=cmd_compress)
