"""`leanformer eval`: perplexity over windows, KLD / top-1 against a reference, per-layer diagnosis
(encoders: STS-B, SST-2, cosine to a reference)."""

from __future__ import annotations

import json
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli.common import (
    input_paths,
    load_model,
    model_command,
    print_table,
)
from leanformer.errors import LeanformerError
from leanformer.hub import resolve_model
from leanformer.outputs import check_output_file


def cmd_eval(args) -> None:
    import leanformer as lf
    from leanformer.cli.encoders import eval_encoder, is_onnx_export
    from leanformer.measure.evaluate import evaluate, read_text, tokenize

    if args.json:  # before minutes of evaluation, not after
        check_output_file(args.json, input_paths(args))
    if args.data and not Path(args.data).expanduser().is_file():
        raise LeanformerError(f"data file not found: {args.data}")
    if args.stride is not None and args.stride > args.window:
        raise LeanformerError(f"--stride ({args.stride}) must not exceed --window ({args.window})")
    policy = _long_policy(args)  # --long's flags fail here, before the model loads
    if args.ray:
        _check_ray(args)
    if is_onnx_export(resolve_model(args.model)):  # an exported encoder, run by ONNX Runtime
        return eval_encoder(args) if not args.ray else _no_ray_for_encoders()
    model, tok = load_model(args)
    if getattr(model, "family", "") == "bert":  # STS-B / SST-2 / cosine to --reference
        return eval_encoder(args, model, tok) if not args.ray else _no_ray_for_encoders()
    if args.long:
        return _eval_long(args, model, tok, policy)
    if not args.data:
        raise LeanformerError("--data FILE is required for decoder models (e.g. wiki.test.raw)")
    if args.per_layer and not args.reference:
        raise LeanformerError("--per-layer needs --reference ORIGINAL (the model before compression)")
    reference = None
    if args.reference and not args.ray:  # with --ray only the workers load it
        reference, _ = lf.load(resolve_model(args.reference), dtype="float32")
    ids = tokenize(tok, read_text(args.data, args.max_chars))
    if args.ray:  # the same windows and batches, spread over Ray workers; the sums added in order
        from leanformer.measure.ray_split import evaluate_ray

        ref = resolve_model(args.reference) if args.reference else None
        how = (resolve_model(args.model), args.dtype, args.keep_quantized, ref)
        result = evaluate_ray(model, ids, how, args.window, args.stride, args.batch_size)
    else:
        result = evaluate(model, ids, args.window, args.stride, reference, args.batch_size)
    rows = [("perplexity", f"{result.perplexity:.4f}"), ("scored tokens", str(result.scored_tokens))]
    rows.append(("windows × size / stride", f"{result.windows} × {result.window} / {result.stride}"))
    if result.reference_perplexity is not None:
        delta = 100 * (result.perplexity / result.reference_perplexity - 1)
        rows += [("reference perplexity", f"{result.reference_perplexity:.4f}"), ("ΔPPL", f"{delta:+.2f}%")]
        rows += [
            ("mean KLD vs reference", f"{result.kld:.5f}"),
            ("top-1 agreement", f"{result.top1_agreement:.2%}"),
        ]
    print_table(f"eval {args.model} on {args.data}", ["metric", "value"], rows)
    report = result.as_dict()
    if args.per_layer:
        report["per_layer"] = _per_layer(args, model, reference, ids)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _check_ray(args) -> None:
    """eval --ray: Ray installed, and no option it cannot split, before anything loads."""
    from leanformer.distributed.ray_jobs import require_ray

    require_ray()
    if args.per_layer:
        raise LeanformerError("--per-layer runs in one process; drop --ray")
    if args.tp > 1 or args.pp > 1:
        raise LeanformerError("--ray runs whole models on Ray workers; drop --tp / --pp")


def _no_ray_for_encoders() -> None:
    raise LeanformerError("eval --ray splits a decoder's perplexity windows; for encoders use embed --ray")


SHAKESPEARE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _long_policy(args):
    """--long: SinkWindow(--sinks, --window), or with --kv-budget the eviction policies to compare."""
    from leanformer.cli.generate import kv_policy

    long_only = [
        f for f in ("sinks", "kv_budget", "evict", "tokens", "needles") if getattr(args, f) is not None
    ]
    if not args.long:
        if long_only:
            raise LeanformerError(f"--{long_only[0].replace('_', '-')} goes with --long")
        return None
    if args.reference or args.per_layer or args.ray:
        raise LeanformerError("--long does not combine with --reference / --per-layer / --ray")
    if not args.data and not SHAKESPEARE.is_file():
        raise LeanformerError(f"--long reads --data FILE (default {SHAKESPEARE}, which is missing)")
    if args.kv_budget is None:
        return kv_policy(args)  # --window W: the sliding window
    saved, args.window = args.window, None
    try:
        return kv_policy(args)
    finally:
        args.window = saved


def _eval_long(args, model, tok, policy) -> None:
    from leanformer.measure.evaluate import read_text, tokenize
    from leanformer.measure.long_context import run_eviction, run_window
    from leanformer.models.kv_policy import HeavyHitters, SinkWindow, SnapKV

    data = args.data or SHAKESPEARE
    ids = tokenize(tok, read_text(data, args.max_chars))[: args.tokens]
    if len(ids) < 2:
        raise LeanformerError(f"{data} holds fewer than 2 tokens")
    if isinstance(policy, SinkWindow):
        if policy.capacity() > model.args.max_position_embeddings:
            raise LeanformerError(
                f"--window {policy.window} (+ sinks and an eviction chunk of {policy.step}) exceeds the "
                f"model's context of {model.args.max_position_embeddings}"
            )
        rows, points, report = run_window(model, ids, policy, args.chunk)
        header = ["attention", "tokens", f"ppl (first {report['fit_tokens']})", "ppl (all)", "KV MB"]
        print_table(f"eval --long {args.model} on {data}", header, rows)
        print_table("decode checkpoints (sinks + window)", ["position", "tok/s", "RSS MB"], points)
    else:
        prompt_len = min(args.prompt_len, model.args.max_position_embeddings - args.score_len)
        if args.evict is None:  # both, side by side
            both = {
                "h2o": HeavyHitters(policy.budget, policy.sinks),
                "snapkv": SnapKV(policy.budget, policy.sinks),
            }
        else:
            both = {args.evict: policy}
        needles = 10 if args.needles is None else args.needles
        rows, report = run_eviction(model, tok, ids, both, prompt_len, args.score_len, args.blocks, needles)
        header = ["KV", "ppl", "ΔPPL", f"needles ({needles})"]
        title = f"eval --long {args.model}: {prompt_len}-token prompts at KV budget {policy.budget}"
        print_table(title, header, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _per_layer(args, model, reference, ids: list[int]) -> list[dict]:
    import dataclasses

    import torch

    from leanformer.measure.diagnose import ignore_pattern, per_layer_errors, table_rows

    n = min(args.per_layer_windows, len(ids) // args.window)
    windows = torch.tensor(ids[: n * args.window]).view(n, args.window)
    rows = per_layer_errors(model, reference, windows, top=args.per_layer_top)
    header = ["layer", "module", "local rel. error", "KLD with only this layer compressed"]
    print_table(f"per-layer error ({n} windows; worst first)", header, table_rows(rows))
    worst = [ignore_pattern(r) for r in rows[:3] if r.kld_alone]
    if worst:
        print(f"to keep the worst layers in full precision, add to the recipe's ignore list: {worst}")
    return [dataclasses.asdict(r) for r in rows]


def add_parser(sub) -> None:
    p = model_command(
        sub, "eval", "perplexity, and KLD / top-1 agreement vs --reference (encoders: STS-B, SST-2)"
    )
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
    from leanformer.cli.encoders import add_encoder_eval_arguments

    p.add_argument(
        "--ray", action="store_true",
        help="decoders: split the windows over Ray workers, one per CPU of the Ray cluster ($RAY_ADDRESS, "
        "else a local one); the same figures as one process; needs pip install 'leanformer[ray]'",
    )  # fmt: skip
    add_encoder_eval_arguments(p)  # encoder models: --tasks, --stsb, --sst2, --backend
    _add_long_arguments(p)
    p.set_defaults(func=cmd_eval)


def _add_long_arguments(p) -> None:
    from leanformer.cli.generate import add_kv_policy

    p.add_argument(
        "--long", action="store_true",
        help="decoders: perplexity of a long text (default: tiny shakespeare, whole) streamed through a KV "
        "policy: --window W (sliding window; with --sinks), or --kv-budget B (eviction on long prompts)",
    )  # fmt: skip
    add_kv_policy(p, window=False)
    g = p.add_argument_group("--long")
    g.add_argument("--tokens", type=ck.int_range(2), default=None, help="stream only the first N tokens")
    g.add_argument(
        "--chunk", type=ck.positive_int, default=1,
        help="tokens per forward when streaming (1: every token is a decode step)",
    )  # fmt: skip
    g.add_argument("--prompt-len", type=ck.int_range(16), default=2048, help="--kv-budget: prompt tokens")
    g.add_argument(
        "--score-len", type=ck.positive_int, default=256, help="--kv-budget: tokens scored after it"
    )
    g.add_argument("--blocks", type=ck.positive_int, default=4, help="--kv-budget: prompts scored")
    g.add_argument(
        "--needles", type=ck.non_negative_int, default=None, help="--kv-budget: pass-key trials (10)"
    )
