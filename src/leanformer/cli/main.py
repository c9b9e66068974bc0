"""`leanformer` command line: generate | chat | eval | bench | compress | serve | bench-serve | embed |
train-probe | prune-heads | export | distill | pull | demo. One module per command group; this one assembles them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli import (
    bench,
    compress,
    distill,
    encoders,
    evaluate,
    generate,
    optimize,
    prune_encoders,
    report,
    serve,
)
from leanformer.errors import LeanformerError

DESCRIPTION = "Make Transformer models fast and small on the CPU you have, and measure what it costs."

COMMAND_GROUPS = (
    generate,
    evaluate,
    bench,
    compress,
    serve,
    encoders,
    prune_encoders,
    distill,
    report,
    optimize,
)


def cmd_pull(args) -> None:
    from leanformer.hub import KNOWN, pull

    if args.list:
        for name, spec in KNOWN.items():
            print(f"{name}\t{spec}")
        return
    if not args.name:
        raise LeanformerError("give a model name to pull (see `leanformer pull --list`)")
    print(pull(args.name, Path(args.cache_dir) if args.cache_dir else None))


def cmd_demo(args) -> None:
    from leanformer.cli.demo import run_demo

    run_demo(quick=args.quick)


def build_parser() -> ck.OneLineParser:
    parser = ck.OneLineParser(prog="leanformer", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    p = sub.add_parser("pull", help="bring a known real model into the local cache and print its path")
    p.add_argument("name", nargs="?")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--list", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "demo", help="chat with SmolLM2 and compare leanformer's variants with HF transformers"
    )
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.set_defaults(func=cmd_demo)

    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error: ...` line on stderr, no traceback), 130 Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    with warnings.catch_warnings():  # warnings (NaN weights, ...) as one line, not file:line + source
        warnings.showwarning = _one_line_warning
        try:
            args.func(args)
        except LeanformerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
