"""`leanformer compress`: apply a recipe, save the result, and show what it cost on one screen."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from leanformer.cli import args as ck
from leanformer.errors import LeanformerError


def calibration_ids(tok, path: str, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids cut from a text file (evenly spread over it)."""
    from leanformer.measure.evaluate import read_text, tokenize

    ids = torch.tensor(tokenize(tok, read_text(path)))
    if len(ids) < seq_len:
        raise LeanformerError(
            f"calibration file {path} has {len(ids)} tokens, fewer than one sample of {seq_len}"
        )
    starts = torch.linspace(0, len(ids) - seq_len, samples).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


def decode_speed(model, vocab: int, new_tokens: int = 32) -> float:
    """Batch-1 greedy decode tokens/s from the median of timed decode steps (robust to one slow step)."""
    from leanformer.measure.bench.runner import decode_rate, leanformer_decode_steps

    prompt = torch.randint(10, vocab, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    leanformer_decode_steps(model, [prompt], 4)  # warm-up
    return decode_rate([leanformer_decode_steps(model, [prompt], new_tokens) for _ in range(2)], 1)


def cmd_compress(args) -> None:
    import leanformer as lf
    from leanformer.cli.common import print_table
    from leanformer.compress import apply, load_recipe
    from leanformer.hub import resolve_model
    from leanformer.measure.bench.runner import _nbytes
    from leanformer.measure.evaluate import evaluate, read_text, tokenize
    from leanformer.outputs import check_output_dir

    recipe = load_recipe(args.recipe)
    for stage in recipe.stages:  # a bad recipe file fails in one line before the model loads
        stage.validate()
    for flag, name in (("--calibration", args.calibration), ("--eval-data", args.eval_data)):
        if name and not Path(name).expanduser().is_file():  # read only after compressing: check now
            raise LeanformerError(f"{flag} file not found: {name}")
    path = resolve_model(args.model)
    # the output rules before minutes of loading and GPTQ: never the model's own folder, and only an
    # earlier leanformer save is replaced without --overwrite (outputs.py)
    check_output_dir(args.output, args.overwrite, inputs=[path])
    model, tok = lf.load(path, dtype=args.dtype)
    original = copy.deepcopy(model)
    needs_calibration = [type(c).__name__ for c in recipe.stages if c.needs_calibration]
    calibration = None
    if args.calibration:
        calibration = calibration_ids(tok, args.calibration, args.calibration_samples, args.calibration_len)
    elif needs_calibration:
        raise LeanformerError(
            f"this recipe ({', '.join(needs_calibration)}) needs --calibration FILE (plain text, e.g. a wiki dump)"
        )
    apply(model, recipe, calibration=calibration)
    out = lf.save(model, tok, args.output, overwrite=args.overwrite)
    rows = [
        ("saved to", str(out)),
        ("weights before → after (MB)", f"{_nbytes(original) / 2**20:.1f} → {_nbytes(model) / 2**20:.1f}"),
    ]
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
    p.add_argument(
        "--calibration",
        default=None,
        help="text file for calibration (GPTQ, AWQ, Wanda, SparseGPT, PruneFFN)",
    )
    p.add_argument("--calibration-samples", type=ck.positive_int, default=16)
    p.add_argument("--calibration-len", type=ck.int_range(2), default=512, help="tokens per sample")
    p.add_argument("--eval-data", default=None, help="held-out text: report PPL and KLD vs the original")
    p.add_argument("--eval-chars", type=ck.positive_int, default=20_000)
    p.add_argument("--window", type=ck.int_range(2), default=512, help="eval window, at least 2 tokens")
    p.add_argument("--no-speed", action="store_true", help="skip the decode speed before/after")
    p.set_defaults(func=cmd_compress)
