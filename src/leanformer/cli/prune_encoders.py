"""Encoder pruning commands for the `leanformer` CLI: prune-heads | prune-encoder (structured: attention
heads, and heads + FFN channels with a least-squares refit) | prune-weights (unstructured / N:M zeros:
Magnitude, Wanda, SparseGPT; then int8 and sparse storage). main.py calls add_parser(subparsers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli.encoders import OVERWRITE_HELP, existing_paths, read_lines, resolve_encoder
from leanformer.errors import LeanformerError
from leanformer.outputs import check_output_dir


def _load_for_pruning(args):
    """prune-heads / prune-encoder: output and --calibration checked first, then (model, tok)."""
    from leanformer.encoders.build import load_encoder

    if args.output:  # before loading and pruning
        check_output_dir(args.output, args.overwrite, existing_paths(args.model))
    if args.calibration and not Path(args.calibration).expanduser().is_file():
        raise LeanformerError(f"--calibration file not found: {args.calibration}")
    return load_encoder(resolve_encoder(args.model))


def _calibration_texts(args) -> list[str]:
    """--calibration lines, or the first --limit SST-2 train sentences."""
    from leanformer.encoders.quality import glue_path, read_tsv

    if args.calibration:
        return read_lines(args.calibration)[: args.limit]
    return [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), args.limit)]


def cmd_prune_heads(args) -> None:
    from leanformer.encoders.prune_heads import prune_heads_, prune_heads_auto_
    from leanformer.encoders.quality import eval_stsb

    model, tok = _load_for_pruning(args)
    if args.heads:
        prune_heads_(model, args.heads)  # already {layer: [heads]} (cli_args.heads_json)
    else:
        texts = _calibration_texts(args)
        prune_heads_auto_(model, tok, texts, args.fraction, method=args.method, steps=args.steps)
    print(f"heads per layer: {model.args.heads_per_layer}; pruned: {model.config.get('pruned_heads')}")
    if args.eval:
        print(f"STS-B Spearman: {eval_stsb(model, tok)['stsb_spearman']:.4f}")
    if args.output:
        from leanformer.loading import save

        print(f"saved to {save(model, tok, args.output, overwrite=args.overwrite)}")


def cmd_prune_encoder(args) -> None:
    from leanformer.encoders.prune_encoder import prune_encoder_
    from leanformer.encoders.quality import eval_stsb

    model, tok = _load_for_pruning(args)
    texts = _calibration_texts(args)
    before = eval_stsb(model, tok)["stsb_spearman"] if args.eval else None
    r = prune_encoder_(
        model, tok, texts, args.fraction, args.head_fraction, args.multiple, args.method, args.steps,
        refit=not args.no_refit,
    )  # fmt: skip
    print(
        f"removed {r['removed_fraction']:.1%} of the block weights ({r['block_params_before']:,} → "
        f"{r['block_params_after']:,}); heads per layer {r['heads_per_layer']}; "
        f"FFN widths {r['intermediate_sizes']}"
    )
    if args.eval:
        after = eval_stsb(model, tok)["stsb_spearman"]
        print(f"STS-B Spearman: {before:.4f} → {after:.4f} ({after - before:+.4f})")
    if args.output:
        from leanformer.loading import save

        print(f"saved to {save(model, tok, args.output, overwrite=args.overwrite)}")


METHODS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def nm_pattern(text: str) -> str:
    """--pattern: "unstructured" or "N:M" with 0 < N < M, checked when parsed."""
    from leanformer.compress.config import parse_pattern

    try:
        parse_pattern(text, "--pattern")
    except LeanformerError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--pattern: ")) from None
    return text


def _weights_config(args):
    """The pruning config of prune-weights, validated (sparsity vs pattern) before anything loads."""
    from leanformer.compress import config as cc

    if args.int8 == "dynamic" and args.sparse_storage:
        raise LeanformerError(
            "--sparse-storage stores float or --int8 weights codes, not --int8 dynamic; "
            "choose one (dynamic: fastest, weights + --sparse-storage: smallest)"
        )
    nm = cc.parse_pattern(args.pattern, "--pattern")
    sparsity = args.sparsity if args.sparsity is not None else (1 - nm[0] / nm[1] if nm else 0.5)
    if nm and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise LeanformerError(
            f"--pattern {args.pattern} means sparsity {1 - nm[0] / nm[1]:g}; drop --sparsity {args.sparsity:g}"
        )
    if sparsity == 0:
        raise LeanformerError("--sparsity 0 prunes nothing; give a value in (0, 1)")
    cfg = getattr(cc, METHODS[args.method])(sparsity=sparsity, pattern=args.pattern)
    cfg.validate()
    return cfg


def cmd_prune_weights(args) -> None:
    from leanformer.compress import Int8Dynamic, Int8WeightOnly, quantize_
    from leanformer.compress.sparse import SparseStorage
    from leanformer.encoders.prune_weights import prune_weights_
    from leanformer.encoders.quality import eval_stsb

    cfg = _weights_config(args)
    model, tok = _load_for_pruning(args)
    before = eval_stsb(model, tok)["stsb_spearman"] if args.eval else None
    texts = _calibration_texts(args) if cfg.needs_calibration else None
    zeros = prune_weights_(model, tok, texts, cfg)
    share = sum(zeros.values()) / len(zeros)
    print(f"{type(cfg).__name__} {cfg.pattern}: {len(zeros)} Linears, {share:.1%} of their weights zero")
    if args.int8:
        quantize_(model, Int8Dynamic() if args.int8 == "dynamic" else Int8WeightOnly(), progress=False)
    if args.sparse_storage:
        quantize_(model, SparseStorage(), progress=False)
    if args.eval:
        after = eval_stsb(model, tok)["stsb_spearman"]
        print(f"STS-B Spearman: {before:.4f} → {after:.4f} ({after - before:+.4f})")
    if args.output:
        from leanformer.loading import save

        out = save(model, tok, args.output, overwrite=args.overwrite)
        size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
        print(f"saved to {out} ({size / 2**20:.1f} MiB of weights)")


def _add_calibration_and_output(p, eval_help: str) -> None:
    """The options both pruning commands share: calibration text, --eval, where to save."""
    p.add_argument("--calibration", default=None, help="text file (default: 512 SST-2 train sentences)")
    p.add_argument("--limit", type=ck.positive_int, default=512)
    p.add_argument("--eval", action="store_true", help=eval_help)
    p.add_argument("--output", default=None, help="save the pruned model here (reloads pruned)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_parser(sub) -> None:
    """prune-heads, prune-encoder and prune-weights."""
    p = sub.add_parser("prune-heads", help="remove attention heads (by importance on calibration text)")
    p.add_argument("model")
    p.add_argument(
        "--fraction", type=ck.float_range(0.0, 1.0, high_open=True), default=0.25,
        help="share of all heads to remove, in [0, 1)",
    )  # fmt: skip
    p.add_argument("--method", choices=["taylor", "norm"], default="taylor")
    p.add_argument(
        "--steps", type=ck.positive_int, default=4, help="prune in N rounds, re-ranking after each"
    )
    p.add_argument(
        "--heads",
        type=ck.heads_json,
        default=None,
        help='explicit JSON {"layer": [heads]} instead of --fraction',
    )
    _add_calibration_and_output(p, eval_help="report STS-B Spearman after pruning")
    p.set_defaults(func=cmd_prune_heads)

    p = sub.add_parser(
        "prune-encoder", help="remove a share of the block weights: attention heads + FFN channels"
    )
    p.add_argument("model")
    p.add_argument(
        "--fraction", type=ck.float_range(0.0, 1.0, high_open=True), default=0.3,
        help="share of the attention + FFN weights to remove, in [0, 1) (default 0.3)",
    )  # fmt: skip
    p.add_argument(
        "--head-fraction", type=ck.float_range(0.0, 1.0, high_open=True), default=None,
        help="share of the heads to remove (default: half of --fraction); the FFN gives the rest",
    )  # fmt: skip
    p.add_argument("--multiple", type=ck.positive_int, default=32, help="FFN widths a multiple of this")
    p.add_argument("--method", choices=["taylor", "norm"], default="taylor", help="head importance")
    p.add_argument("--steps", type=ck.positive_int, default=4, help="head pruning rounds")
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit of the outputs")
    _add_calibration_and_output(p, eval_help="report STS-B Spearman before and after")
    p.set_defaults(func=cmd_prune_encoder)

    p = sub.add_parser(
        "prune-weights", help="zero a share of the block weights (Magnitude / Wanda / SparseGPT, N:M)"
    )
    p.add_argument("model")
    p.add_argument("--method", choices=list(METHODS), default="wanda")
    p.add_argument(
        "--sparsity", type=ck.float_range(0.0, 1.0, high_open=True), default=None,
        help="share of each row's weights to zero, in [0, 1) (default 0.5; implied by an N:M --pattern)",
    )  # fmt: skip
    p.add_argument(
        "--pattern", type=nm_pattern, default="unstructured", help='"unstructured" or N:M, e.g. 2:4'
    )
    p.add_argument(
        "--int8", choices=["dynamic", "weights"], default=None,
        help="then quantize: dynamic = int8 matmuls (fastest), weights = int8 weights (smallest with "
        "--sparse-storage)",
    )  # fmt: skip
    p.add_argument(
        "--sparse-storage", action="store_true",
        help="save the zeros as bitmask + values (smaller files; same speed and outputs)",
    )  # fmt: skip
    _add_calibration_and_output(p, eval_help="report STS-B Spearman before and after")
    p.set_defaults(func=cmd_prune_weights)
