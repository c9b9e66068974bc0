"""Encoder commands for the `leanformer` CLI: embed | train-probe | export (encoders and decoder LMs) |
eval-encoder, and the encoder branch of `leanformer eval` (eval_encoder, with the options of
add_encoder_eval_arguments). main.py calls add_parser(subparsers)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from leanformer.cli import args as ck
from leanformer.errors import LeanformerError
from leanformer.outputs import (
    check_output_dir,
    check_output_file,
    new_temp_dir,
    replace_dir,
    umask_permissions,
)

BACKENDS = ("torch", "onnxruntime")
RAY_HELP = (
    "split the input over Ray workers, one per CPU of the Ray cluster ($RAY_ADDRESS, else a local "
    "one); the same result as one process, in input order; needs pip install 'leanformer[ray]'"
)
OVERWRITE_HELP = (
    "replace the output folder even when it is not empty and not an earlier output of this command "
    "(never the model's own folder, a folder above it, the current or home folder)"
)


def resolve_encoder(name_or_path: str) -> str:
    try:  # known names (e.g. all-minilm-l6-v2) come from the lead's hub
        from leanformer.hub import resolve_model

        return resolve_model(name_or_path)
    except ImportError:
        return name_or_path


def is_onnx_export(path: str | Path) -> bool:
    from leanformer.export.encoder import ONNX_FILE

    p = Path(path).expanduser()
    return (p / ONNX_FILE).exists() or p.suffix == ".onnx"


def load(model: str, backend: str = "torch", loaded: tuple | None = None, dtype: str = "float32"):
    """(model, tokenizer) for a model folder or an export folder, run by torch or ONNX Runtime.

    With backend=onnxruntime an HF folder (or the already `loaded` (model, tok) of it) is exported
    first, parity-checked, into a temporary folder. dtype bfloat16: the matmuls in bf16, the rest in fp32
    (1.5-1.8x the embeddings/s of float32 where the CPU has AVX-512 BF16 / AMX, cosine to float32 >=
    0.99996 on all-MiniLM-L6-v2); dtype float16 on AVX512-FP16 CPUs: the matmuls in fp16
    (kernels/h16.py), the rest in fp32.
    """
    import torch

    from leanformer.encoders.build import load_encoder
    from leanformer.export.encoder import export_onnx, load_onnx_encoder

    path = Path(resolve_encoder(model)).expanduser()
    if not path.exists():
        raise LeanformerError(f"model path not found: {path}")
    if is_onnx_export(path):
        if backend != "onnxruntime":
            raise LeanformerError(f"{path} is an ONNX export: use --backend onnxruntime")
        return load_onnx_encoder(path)
    m, tok = loaded if loaded is not None else load_encoder(path, dtype=getattr(torch, dtype))
    if backend == "torch":
        return m, tok
    with tempfile.TemporaryDirectory(prefix="leanformer-onnx-") as out:
        report = export_onnx(m, out, tok)
        print(f"exported for onnxruntime; max abs diff vs torch: {_fmt_diffs(report)}", file=sys.stderr)
        return load_onnx_encoder(out)  # the session holds the graph in memory: the folder can go


def _fmt_diffs(report: dict) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in report["max_abs_diff"].items())


def read_lines(src: str) -> list[str]:
    if src == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    p = Path(src)
    if not p.exists():
        raise LeanformerError(f"input file not found: {p}")
    return [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def existing_paths(model: str) -> list[str]:
    """The input model's path when it is one: outputs must never overwrite it."""
    path = Path(resolve_encoder(model)).expanduser()
    return [str(path)] if path.exists() else []


def _is_export(path: Path) -> bool:
    from leanformer.export.encoder import ONNX_FILE

    return (path / ONNX_FILE).is_file() and (path / "config.json").is_file()


def _is_probe_copy(path: Path) -> bool:
    """An earlier `train-probe --output`: a model folder with probe.json beside config.json."""
    return (path / "probe.json").is_file() and (path / "config.json").is_file()


def cmd_embed(args) -> None:
    from leanformer.encoders.embed import embed

    if args.output:  # before reading stdin and loading the model
        check_output_file(args.output, existing_paths(args.model))
    if args.ray:
        from leanformer.distributed.ray_jobs import require_ray

        require_ray()
        if args.backend != "torch":
            raise LeanformerError("--ray runs the torch backend on every worker; drop --backend onnxruntime")
        if args.dtype != "float32":
            raise LeanformerError("--ray embeds in float32 on every worker; drop --dtype")
    if args.dtype != "float32" and args.backend != "torch":
        raise LeanformerError(
            f"--dtype {args.dtype} runs on the torch backend; drop --backend {args.backend}"
        )
    if args.dtype == "float16":
        from leanformer.kernels.h16 import native_f16

        if not native_f16():
            raise LeanformerError(
                "--dtype float16 runs fp16 matmuls on CPUs with AVX512-FP16 (Intel Sapphire Rapids and later), "
                "which this one lacks: use --dtype bfloat16 (AVX-512 BF16 / AMX) or float32"
            )
    long = _long_options(args)  # before reading stdin and loading the model
    texts = read_lines(args.input)
    if not texts:
        raise LeanformerError(f"no text to embed in {args.input} (one text per non-empty line)")
    model, tok = load(args.model, args.backend, dtype=args.dtype)
    if args.ray:  # the same batches, spread over Ray workers: the same numbers, in input order
        from leanformer.measure.ray_split import embed_ray

        emb = embed_ray(resolve_encoder(args.model), model, tok, texts, args.batch_size, args.normalize)
    else:
        emb = embed(model, tok, texts, args.batch_size, normalize=args.normalize, **long)  # [N, D] float32
    if args.output and args.output.endswith(".npy"):
        np.save(args.output, emb)
    else:
        with open(args.output, "w", encoding="utf-8") if args.output else nullcontext(sys.stdout) as out:
            for text, e in zip(texts, emb):
                out.write(json.dumps({"text": text, "embedding": [round(float(v), 7) for v in e]}) + "\n")
    if args.output:
        print(f"wrote {len(texts)} embeddings of dim {emb.shape[1]} to {args.output}", file=sys.stderr)


def _long_options(args) -> dict:
    """embed()'s attention keywords from --attention / --window / --bucket-size / --hashes / --max-length /
    --positions (models/bert_attention.py); checked before any work."""
    attention = getattr(args, "attention", "dense")
    if attention != "dense" or args.max_length:
        if args.backend != "torch":
            raise LeanformerError("--attention local/lsh and --max-length run on --backend torch only")
        if getattr(args, "ray", False):
            raise LeanformerError("--attention local/lsh and --max-length run in one process: drop --ray")
    out: dict = {"attention": attention, "max_length": args.max_length, "positions": args.positions}
    if attention == "local":
        out["window"] = args.window
    if attention == "lsh":
        out |= {"bucket_size": args.bucket_size, "hashes": args.hashes}
    return out


def cmd_train_probe(args) -> None:
    from leanformer.encoders.probe import train_probe
    from leanformer.encoders.quality import eval_sst2, glue_path, read_tsv

    data = args.data or glue_path("sst2", "train")
    rows = read_tsv(data, args.limit)
    if not rows or args.text_column not in rows[0] or args.label_column not in rows[0]:
        raise LeanformerError(
            f"{data} needs a header with columns {args.text_column!r} and {args.label_column!r}"
        )
    src = Path(resolve_encoder(args.model)).expanduser()
    out = Path(args.output).expanduser() if args.output else src
    in_place = out.resolve() == src.resolve()  # the default: probe files added beside the model's
    if not in_place:  # a copy of the model folder with the probe, replacing only an earlier one
        check_output_dir(out, args.overwrite, [src], ours=_is_probe_copy, kind="train-probe output")
    model, tok = load(str(src))
    texts, labels = [r[args.text_column] for r in rows], [r[args.label_column] for r in rows]
    if in_place:
        result = train_probe(model, tok, texts, labels, epochs=args.epochs, save_to=out)
    else:
        tmp = new_temp_dir(out)
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            umask_permissions(
                tmp
            )  # copytree copied the source's modes: a read-only model stays writable here
            result = train_probe(model, tok, texts, labels, epochs=args.epochs, save_to=tmp)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"probe on {len(texts)} examples, labels {result['labels']}: train accuracy {result['train_accuracy']:.4f}"
    )
    if args.eval:
        print(f"SST-2 dev accuracy: {eval_sst2(model, tok, args.eval)['sst2_accuracy']:.4f}")
    print(f"saved {out / 'probe.safetensors'} and probe.json; `classify` now works on {out}")


def cmd_export(args) -> None:
    """ONNX export of an encoder (export/encoder.py) or a decoder LM with past key/values (export/decoder.py)."""
    from leanformer.export.encoder import ONNX_FILE
    from leanformer.loading import load as load_model

    given = args.out or args.output
    if not given:
        raise LeanformerError("give the output folder: `leanformer export MODEL OUT` (or --output OUT)")
    out = check_output_dir(
        given, args.overwrite, existing_paths(args.model), ours=_is_export, kind="ONNX export"
    )
    model, tok = load_model(
        resolve_encoder(args.model), fast=False
    )  # plain Linears: what the exporter traces
    bert = getattr(model, "family", "") == "bert"
    if args.legacy_exporter and not bert:
        raise LeanformerError("--legacy-exporter is for encoders: decoders need the dynamo exporter (GQA)")
    tmp = new_temp_dir(out)  # exported whole, then moved in: an earlier export is replaced atomically
    try:
        if bert:
            from leanformer.export.encoder import export_onnx

            report = export_onnx(model, tmp, tok, opset=args.opset, dynamo=not args.legacy_exporter)
        else:
            from leanformer.export.decoder import export_decoder_onnx

            report = export_decoder_onnx(model, tmp, tok, opset=args.opset)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"wrote {out / ONNX_FILE} in {report['seconds']} s; parity vs our torch forward, max abs diff: {_fmt_diffs(report)}"
    )


def add_encoder_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options the encoder branch of `leanformer eval` reads (all optional)."""
    p.add_argument(
        "--tasks", default=None, help="comma list of stsb, sst2 (default: stsb, + sst2 with a head/probe)"
    )
    p.add_argument("--stsb", default=None, help="STS-B dev.tsv (default: ../shared/data/glue/stsb/dev.tsv)")
    p.add_argument("--sst2", default=None, help="SST-2 dev.tsv (default: ../shared/data/glue/sst2/dev.tsv)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")


def eval_encoder(args, model=None, tok=None) -> dict:
    """STS-B Spearman, SST-2 accuracy (head or probe) and, with --reference, cosine to the reference's
    embeddings (mean and minimum over the STS-B sentences). Prints a table; --json writes it."""
    from leanformer.encoders.embed import embed
    from leanformer.encoders.quality import cosine_to_reference, eval_sst2, eval_stsb, glue_path, read_tsv

    backend = getattr(args, "backend", "torch")
    if getattr(args, "json", None):  # before the evaluation, not after
        check_output_file(args.json, existing_paths(args.model))
    if model is None or backend != "torch":
        model, tok = load(args.model, backend, None if model is None else (model, tok))
    # cli's eval --batch-size defaults to 1 for decoders; encoders batch 32 unless told otherwise
    bs = args.batch_size if getattr(args, "batch_size", None) and args.batch_size > 1 else 32
    has_classifier = bool(model.args.head or model.args.probe_labels)
    tasks = (getattr(args, "tasks", None) or ("stsb,sst2" if has_classifier else "stsb")).split(",")
    result: dict = {"model": args.model, "backend": backend}
    if "stsb" in tasks:
        result |= eval_stsb(model, tok, getattr(args, "stsb", None), bs)
    if "sst2" in tasks:
        result |= eval_sst2(model, tok, getattr(args, "sst2", None), bs)
    if getattr(args, "reference", None):
        rows = read_tsv(getattr(args, "stsb", None) or glue_path("stsb"))
        texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
        ref, ref_tok = load(args.reference, "torch")
        result |= cosine_to_reference(embed(model, tok, texts, bs), embed(ref, ref_tok, texts, bs))
    for k, v in result.items():
        print(f"{k:>16}  {v:.4f}" if isinstance(v, float) else f"{k:>16}  {v}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def add_parser(sub) -> None:
    """Register embed | train-probe | export | prune-heads | prune-encoder | eval-encoder on the CLI's subparsers."""
    p = sub.add_parser("embed", help="sentence embeddings for lines of text (encoder models)")
    p.add_argument("model", help="HF / sentence-transformers folder, export folder, or a known name")
    p.add_argument("--input", default="-", help="text file, one text per line; - = stdin (default)")
    p.add_argument(
        "--output", default=None, help="out.npy (float32 [N, D]) or out.jsonl; default: JSONL to stdout"
    )
    p.add_argument("--batch-size", type=ck.positive_int, default=32)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="torch backend: bfloat16 is faster where the CPU computes bf16 at twice fp32's rate (AMD Zen "
        "4 / 5, AMX; cosine to float32 0.99996 on all-MiniLM-L6-v2), slower elsewhere; float16 runs fp16 "
        "matmuls on CPUs with AVX512-FP16 (Intel Sapphire Rapids and later; cosine 0.99999)",
    )  # fmt: skip
    p.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None, help="default: as the model"
    )
    p.add_argument("--ray", action="store_true", help=RAY_HELP)
    p.add_argument(
        "--attention", choices=["dense", "local", "lsh"], default="dense",
        help="local: block-local attention (blocks of --window tokens see their own and the neighbouring blocks); lsh: Reformer-style buckets (--bucket-size, --hashes)",
    )  # fmt: skip
    p.add_argument(
        "--window", type=ck.positive_int, default=256, help="local: block length; every key within it is seen"
    )
    p.add_argument("--bucket-size", type=ck.positive_int, default=64, help="lsh: tokens per chunk")
    p.add_argument("--hashes", type=ck.int_range(1, 17), default=2, help="lsh: hash rounds (1-16)")
    p.add_argument(
        "--max-length", type=ck.int_range(2), default=None,
        help="tokens kept per text (default: the model's limit); longer than its positions: see --positions",
    )  # fmt: skip
    p.add_argument(
        "--positions", choices=["interpolate", "repeat"], default="interpolate",
        help="past the position table: interpolate it (default) or repeat it",
    )  # fmt: skip
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("train-probe", help="fit a logistic-regression probe on frozen embeddings")
    p.add_argument("model")
    p.add_argument("--data", default=None, help="TSV with a header (default: SST-2 train from ../shared)")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=ck.positive_int, default=None, help="use only the first N rows (speed)")
    p.add_argument("--epochs", type=ck.positive_int, default=100, help="L-BFGS iterations")
    p.add_argument("--output", default=None, help="folder for model + probe (default: the model folder)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--eval", default=None, help="a dev TSV to report accuracy on, e.g. SST-2 dev.tsv")
    p.set_defaults(func=cmd_train_probe)

    p = sub.add_parser(
        "export", help="ONNX export (encoders; decoder LMs with past key/values) + parity check vs torch"
    )
    p.add_argument("model")
    p.add_argument("out", nargs="?", default=None, help="folder: model.onnx, config.json, tokenizer")
    p.add_argument("--output", default=None, help="the same as OUT")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--opset", type=ck.positive_int, default=18)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--legacy-exporter", action="store_true", help="encoders: TorchScript exporter instead of dynamo"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval-encoder", help="STS-B / SST-2 / cosine-to-reference for an encoder")
    p.add_argument("model")
    p.add_argument("--reference", default=None, help="another encoder: cosine of every embedding to its")
    p.add_argument("--batch-size", type=ck.positive_int, default=32)
    p.add_argument("--json", default=None)
    add_encoder_eval_arguments(p)
    p.set_defaults(func=eval_encoder)
