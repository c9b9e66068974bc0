"""`leanformer` command line: generate | chat | eval | bench | pull | demo (+ encoder commands)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import cli_args as ck
from .errors import LeanformerError
from .outputs import check_output_file


def resolve_model(name_or_path: str) -> str:
    """A path as given, or a known model name (see `leanformer pull --list`) brought into the cache."""
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    from .hub import KNOWN, pull

    if name_or_path.lower() in {k.lower() for k in KNOWN}:
        return str(pull(name_or_path))
    raise LeanformerError(
        f"model not found: {name_or_path!r} is neither a path nor a known name ({', '.join(sorted(KNOWN))})"
    )


KEEP_QUANTIZED_HELP = "GGUF: load Q4_0/Q4_1/Q8_0 tensors straight into int4/int8 modules (no float copy)"


def _load(args):
    import leanformer as lf

    keep = getattr(args, "keep_quantized", False)
    return lf.load(resolve_model(args.model), dtype=args.dtype, keep_quantized=keep)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=ck.positive_int, default=128)
    p.add_argument("--temperature", type=ck.non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=ck.non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=ck.probability, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=ck.positive_float, default=1.0, help="> 0; 1 = off")
    p.add_argument("--seed", type=ck.seed, default=None, help="0 <= seed < 2**63")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling(args) -> dict:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_generate(args) -> None:
    import leanformer as lf

    model, tok = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
    elif tok is None:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise LeanformerError(
                "this model has no tokenizer: --prompt must be space-separated token ids, e.g. '1 2 3'"
            ) from None
    pieces = lf.stream_generate(
        model, tok, prompt, args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos, **_sampling(args)
    )
    if not args.chat and tok is not None:
        print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece if isinstance(piece, str) else f" {piece}", end="", flush=True)
    print()


def cmd_chat(args) -> None:
    import leanformer as lf

    model, tok = _load(args)
    if tok is None or not getattr(tok, "chat_template", None):
        raise LeanformerError("this model has no chat template; use `leanformer generate` instead")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": line})
        reply = []
        for piece in lf.stream_generate(model, tok, history, args.max_new_tokens, **_sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_eval(args) -> None:
    import leanformer as lf

    from .encoders_cli import eval_encoder, is_onnx_export
    from .evaluate import evaluate, read_text, tokenize

    if args.json:  # before minutes of evaluation, not after
        check_output_file(args.json, _inputs(args))
    if args.data and not Path(args.data).expanduser().is_file():
        raise LeanformerError(f"data file not found: {args.data}")
    if args.stride is not None and args.stride > args.window:
        raise LeanformerError(f"--stride ({args.stride}) must not exceed --window ({args.window})")
    if is_onnx_export(resolve_model(args.model)):  # an exported encoder, run by ONNX Runtime
        return eval_encoder(args)
    model, tok = _load(args)
    if getattr(model, "family", "") == "bert":  # STS-B / SST-2 / cosine to --reference
        return eval_encoder(args, model, tok)
    if not args.data:
        raise LeanformerError("--data FILE is required for decoder models (e.g. wiki.test.raw)")
    if args.per_layer and not args.reference:
        raise LeanformerError("--per-layer needs --reference ORIGINAL (the model before compression)")
    reference = None
    if args.reference:
        reference, _ = lf.load(resolve_model(args.reference), dtype="float32")
    ids = tokenize(tok, read_text(args.data, args.max_chars))
    result = evaluate(model, ids, args.window, args.stride, reference, args.batch_size)
    rows = [("perplexity", f"{result.perplexity:.4f}"), ("scored tokens", str(result.scored_tokens))]
    rows.append(("windows × size / stride", f"{result.windows} × {result.window} / {result.stride}"))
    if reference is not None:
        delta = 100 * (result.perplexity / result.reference_perplexity - 1)
        rows += [("reference perplexity", f"{result.reference_perplexity:.4f}"), ("ΔPPL", f"{delta:+.2f}%")]
        rows += [
            ("mean KLD vs reference", f"{result.kld:.5f}"),
            ("top-1 agreement", f"{result.top1_agreement:.2%}"),
        ]
    _print_table(f"eval {args.model} on {args.data}", ["metric", "value"], rows)
    report = result.as_dict()
    if args.per_layer:
        report["per_layer"] = _per_layer(args, model, reference, ids)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _inputs(args) -> list[str]:
    """The model / reference / data paths a command reads: outputs must never overwrite them."""
    names = [getattr(args, k, None) for k in ("model", "reference", "data")]
    return [n for n in names if n and Path(n).expanduser().exists()]


def _per_layer(args, model, reference, ids: list[int]) -> list[dict]:
    import dataclasses

    import torch

    from .diagnose import per_layer_errors, table_rows

    n = min(args.per_layer_windows, len(ids) // args.window)
    windows = torch.tensor(ids[: n * args.window]).view(n, args.window)
    rows = per_layer_errors(model, reference, windows, top=args.per_layer_top)
    header = ["layer", "module", "local rel. error", "KLD with only this layer compressed"]
    _print_table(f"per-layer error ({n} windows; worst first)", header, table_rows(rows))
    worst = [r.name for r in rows[:3] if r.kld_alone]
    if worst:
        print(f"to keep the worst layers in full precision, add to the recipe's ignore list: {worst}")
    return [dataclasses.asdict(r) for r in rows]


def cmd_bench(args) -> None:
    import dataclasses

    from .bench.runner import BenchConfig, run_engine

    if args.json:
        check_output_file(args.json, _inputs(args))
    cfg = BenchConfig(
        resolve_model(args.model), args.dtype, args.prompt_tokens, args.new_tokens, args.batch, args.repeats
    )
    cfg.keep_quantized = args.keep_quantized
    if args.recipe:
        from .compress import load_recipe

        for name in args.recipe:
            if name != "none":
                load_recipe(name)  # a bad name fails here, before minutes of benchmarking
    runs = [("leanformer", None if r == "none" else r) for r in (args.recipe or ["none"])]
    runs += [(engine, None) for engine in args.compare or []]
    rows = []
    for engine, recipe in runs:
        label = engine + (" keep-quantized" if engine == "leanformer" and cfg.keep_quantized else "")
        label += f" +{recipe}" if recipe else ""
        print(f"benchmarking {label} ...", file=sys.stderr, flush=True)
        rows.append(run_engine(dataclasses.replace(cfg, recipe=recipe), engine) | {"label": label})
    labels = {"prefill_tok_s": "prefill tokens/s", "ttft_ms": "time to first token (ms)"}
    labels |= {f"decode_tok_s_b{b}": f"decode tokens/s, batch {b}" for b in cfg.batches}
    labels |= {"ceiling_tok_s": "bandwidth ceiling, tokens/s (b=1)"}
    if 1 in cfg.batches:
        for r in rows:
            r["ceiling_pct"] = 100 * r["decode_tok_s_b1"] / r["ceiling_tok_s"]
        labels |= {"ceiling_pct": "decode b=1, % of that ceiling"}
    labels |= {"peak_rss_mb": "peak RSS (MB)", "size_mb": "weights (MB)", "load_s": "load time (s)"}
    # ratios against the peer when there is one, else against the first (uncompressed) row
    ref = next((r for r in rows if r["engine"] != "leanformer"), rows[0])
    ours = [r for r in rows if r["engine"] == "leanformer" and r is not ref]
    # each column names its variant: the label carries the recipe, the dtype is the activation precision
    header = ["metric", *(f"{r['label']} ({r.get('activation_dtype', r['dtype'])})" for r in rows)]
    header += [f"{r['label']} / {ref['label']}" for r in ours]
    body = []
    for key, label in labels.items():
        ratios = [f"{r[key] / ref[key]:.2f}×" for r in ours]
        body.append([label, *(f"{r[key]:.1f}" for r in rows), *ratios])
    title = f"bench {args.model}: {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens"
    _print_table(title, header, body)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(cfg), "results": rows}, indent=2))


def cmd_pull(args) -> None:
    from .hub import KNOWN, pull

    if args.list:
        for name, spec in KNOWN.items():
            print(f"{name}\t{spec}")
        return
    if not args.name:
        raise LeanformerError("give a model name to pull (see `leanformer pull --list`)")
    print(pull(args.name, Path(args.cache_dir) if args.cache_dir else None))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(quick=args.quick)


def _print_table(title: str, header: list[str], rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*[str(c) for c in r])
    Console(width=max(Console().width, 120)).print(t)  # keep ratio columns readable when piped


def build_parser() -> argparse.ArgumentParser:
    parser = ck.OneLineParser(prog="leanformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin) or a known name, e.g. smollm2")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--keep-quantized", action="store_true", help=KEEP_QUANTIZED_HELP)
        return p

    p = model_cmd("generate", "generate text from a prompt (streams)")
    p.add_argument(
        "--prompt", default="", help="text (or space-separated token ids for a model without tokenizer)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = model_cmd("chat", "interactive chat using the model's chat template")
    p.add_argument("--system", default=None)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = model_cmd("eval", "perplexity, and KLD / top-1 agreement vs --reference (encoders: STS-B, SST-2)")
    p.add_argument("--data", help="decoders: text file (e.g. ../shared/data/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--window", type=ck.int_range(2), default=512, help="tokens per window (at least 2)")
    p.add_argument(
        "--stride", type=ck.positive_int, default=None, help="1..window; default: = window (non-overlapping)"
    )
    p.add_argument("--max-chars", type=ck.positive_int, default=None, help="use only the first N characters")
    p.add_argument(
        "--reference", default=None, help="another model: report KL divergence and top-1 agreement"
    )
    p.add_argument("--batch-size", type=ck.positive_int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--per-layer", action="store_true",
        help="with --reference: which compressed layers cause the most output error",
    )  # fmt: skip
    p.add_argument("--per-layer-windows", type=ck.positive_int, default=2, help="windows used by --per-layer")
    p.add_argument("--per-layer-top", type=ck.positive_int, default=10, help="layers attributed end to end")
    from .encoders_cli import add_encoder_eval_arguments

    add_encoder_eval_arguments(p)  # encoder models: --tasks, --stsb, --sst2, --backend
    p.set_defaults(func=cmd_eval)

    p = model_cmd("bench", "prefill / decode speed, TTFT, peak RSS, size")
    p.add_argument("--compare", action="append", choices=["transformers"], help="peer to run in the same run")
    p.add_argument(
        "--recipe", nargs="+", default=None,
        help="compression recipes (preset names or files) to bench, one row each; 'none' = uncompressed",
    )  # fmt: skip
    p.add_argument("--prompt-tokens", type=ck.positive_int, default=128)
    p.add_argument("--new-tokens", type=ck.int_range(2), default=128, help="at least 2 (decode is timed)")
    p.add_argument("--batch", type=ck.positive_int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=ck.positive_int, default=3)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench)

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

    from .compress_cli import add_compress_command

    add_compress_command(sub)
    from .serve_cli import add_serve_commands

    add_serve_commands(sub)
    from .encoders_cli import add_encoder_commands

    add_encoder_commands(sub)
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
