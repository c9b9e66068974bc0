"""What the `leanformer` commands share: the MODEL argument, sampling flags, loading, tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.hub import resolve_model

KEEP_QUANTIZED_HELP = "GGUF: load Q4_0/Q4_1/Q8_0 tensors straight into int4/int8 modules (no float copy)"


def model_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command that takes MODEL (a path or a known name), --dtype and --keep-quantized."""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin) or a known name, e.g. smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep-quantized", action="store_true", help=KEEP_QUANTIZED_HELP)
    return p


def load_model(args):
    from leanformer.loading import load

    keep = getattr(args, "keep_quantized", False)
    return load(resolve_model(args.model), dtype=args.dtype, keep_quantized=keep)


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=ck.positive_int, default=128)
    p.add_argument("--temperature", type=ck.non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=ck.non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=ck.probability, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=ck.positive_float, default=1.0, help="> 0; 1 = off")
    p.add_argument("--seed", type=ck.seed, default=None, help="0 <= seed < 2**63")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling_kwargs(args) -> dict:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def input_paths(args) -> list[str]:
    """The model / reference / data paths a command reads: outputs must never overwrite them."""
    names = [getattr(args, k, None) for k in ("model", "reference", "data")]
    return [n for n in names if n and Path(n).expanduser().exists()]


def print_table(title: str, header: list[str], rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*[str(c) for c in r])
    Console(width=max(Console().width, 120)).print(t)  # keep ratio columns readable when piped
