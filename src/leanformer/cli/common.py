"""What the `leanformer` commands share: the MODEL argument, sampling flags, loading, tables."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.errors import LeanformerError
from leanformer.hub import resolve_model

DEQUANTIZE_HELP = (
    "GGUF: dequantize every tensor to --dtype (default: keep the file's quantization: Q4_0/Q4_1/Q4_K "
    "tensors load straight into int4, Q5_0 into int5, Q8_0/Q6_K into int8 modules, no float copy)"
)
# commands that run the model in this process, so a sharded model works as is; chat's stdin is read by
# rank 0 and broadcast (distributed.launch.SharedStdin). bench and serve add --tp themselves (bench_tp,
# serve/tp.py); compress would save one rank's shard, so it has none.
TP_COMMANDS = ("generate", "eval", "chat")
PP_HELP = (
    "pipeline parallel over N processes (Llama family; layers split, each rank holds 1/N of them; "
    "one stream is not faster): torchrun --standalone --nproc-per-node N --no-python leanformer %(prog)s MODEL --pp N ..."
)
TP_HELP = (
    "tensor parallel over N processes (Llama family and GPT-2; N must divide the KV heads): "
    "torchrun --standalone --nproc-per-node N --no-python leanformer %(prog)s MODEL --tp N ..."
)


def model_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command that takes MODEL (a path or a known name), --dtype and --dequantize."""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin) or a known name, e.g. smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quantized_flags(p)
    add_activations_flag(p)
    if name in TP_COMMANDS:
        p.add_argument("--tp", type=ck.positive_int, default=1, metavar="N", help=TP_HELP)
        p.add_argument("--pp", type=ck.positive_int, default=1, metavar="N", help=PP_HELP)
    return p


def add_activations_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--activations", default="auto", choices=["auto", "int8", "fp32"],
        help="int4 / int8 Linears on int8 activations (the decode step, int4 prefill) or fp32; "
        "auto (default): int8 where measured faster on this CPU's instruction set",
    )  # fmt: skip


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """--calibration FILE (+ samples, length) for the recipes that calibrate (compress, bench, report)."""
    p.add_argument(
        "--calibration",
        default=None,
        help="text file for calibration (GPTQ, AWQ, Wanda, SparseGPT, PruneFFN)",
    )
    p.add_argument("--calibration-samples", type=ck.positive_int, default=16)
    p.add_argument("--calibration-len", type=ck.int_range(2), default=512, help="tokens per sample")


def check_calibration(recipes: list, calibration: str | None) -> None:
    """One line, before any work, when a recipe calibrates and no --calibration FILE (or a missing one)
    was given. recipes: Recipe objects."""
    if calibration:
        path = Path(calibration).expanduser()
        if not path.exists():
            raise LeanformerError(f"--calibration file not found: {calibration}")
        if not path.is_file():
            raise LeanformerError(f"--calibration {calibration} is not a file: give a plain text file")
        if path.stat().st_size == 0:
            raise LeanformerError(f"--calibration file {calibration} is empty: give a plain text file")
    needs = [type(c).__name__ for r in recipes for c in r.stages if c.needs_calibration]
    if needs and not calibration:
        names = ", ".join(dict.fromkeys(needs))
        raise LeanformerError(
            f"this recipe ({names}) needs --calibration FILE (plain text, e.g. a wiki dump)"
        )


def add_quantized_flags(p: argparse.ArgumentParser) -> None:
    """--dequantize (GGUF to float); --keep-quantized, the default now, still accepted (old commands)."""
    p.add_argument("--dequantize", dest="keep_quantized", action="store_false", help=DEQUANTIZE_HELP)
    p.add_argument("--keep-quantized", dest="keep_quantized", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(keep_quantized=True)


def load_model(args):
    """Load MODEL; with --tp N or --pp N > 1 (under torchrun) join the process group and split it.

    Every rank runs the whole command on identical logits; only rank 0 writes to stdout.
    """
    from leanformer.loading import load

    tp, pp = getattr(args, "tp", 1), getattr(args, "pp", 1)
    if tp > 1 and pp > 1:
        raise LeanformerError("use --tp or --pp, not both (2-D parallelism is not supported)")
    size = max(tp, pp)
    if size > 1:
        from leanformer.distributed import join, shared_seed
        from leanformer.distributed.launch import SharedStdin

        rank, _ = join(size, "--tp" if tp > 1 else "--pp")  # before loading: fails in a second
        if rank != 0:
            # the other ranks compute the same text; one copy of the output is wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        sys.stdin = SharedStdin(sys.stdin)  # chat: every rank gets rank 0's lines
        if hasattr(args, "seed"):
            args.seed = shared_seed(args.seed)
    keep = getattr(args, "keep_quantized", True)
    model, tok = load(resolve_model(args.model), dtype=args.dtype, keep_quantized=keep)
    if getattr(args, "activations", "auto") != "auto":
        from leanformer.compress.qbase import set_activations

        set_activations(model, args.activations)
    if tp > 1:
        from leanformer.distributed import check_tp, parallelize_

        kv_heads = getattr(getattr(model, "args", None), "num_key_value_heads", None)
        if kv_heads is not None:  # the message names the flag; parallelize_ checks the rest
            check_tp(kv_heads, tp, "--tp")
        parallelize_(model)
    elif pp > 1:
        from leanformer.distributed import pipeline_

        pipeline_(model)
    return model, tok


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
