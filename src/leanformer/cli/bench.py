"""`leanformer bench`: prefill / decode speed, TTFT, peak RSS and size, each engine in its own process,
the engines taking turns round by round (measure/bench/turns.py)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli.common import (
    TP_HELP,
    add_calibration_flags,
    check_calibration,
    input_paths,
    model_command,
    print_table,
)
from leanformer.hub import resolve_model
from leanformer.outputs import check_output_file, write_file_atomic


def cmd_speculative(args) -> None:
    """--speculative: each method against plain decoding, same process, input-grounded and open-ended."""
    from leanformer.cli.common import load_model
    from leanformer.measure.bench import speculative as sb

    if args.json:
        check_output_file(args.json, input_paths(args))
    sb.passages(args.passages, 1)  # a missing file fails before the model loads
    cfg = sb.SpecBenchConfig(args.new_tokens, args.repeats, args.prompts, args.passages)
    cfg.methods = dict(sb.parse_method(m, sb.load_draft) for m in args.speculative)
    model, tok = load_model(args)
    print(f"benchmarking {', '.join(cfg.methods)} against plain decoding ...", file=sys.stderr, flush=True)
    rows = sb.run(model, tok, cfg)
    title = f"speculative decoding, {args.model}, batch 1, {cfg.new_tokens} new tokens, greedy (median of {cfg.rounds} rounds x {cfg.prompts} prompts)"
    print_table(title, sb.HEADER, sb.table_rows(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": vars(args) | {"func": None}, "results": rows}, indent=2)
        )


def peers_arg(text: str) -> list[str]:
    """--peers: comma-separated peer names, checked at parse time."""
    import argparse

    from leanformer.errors import LeanformerError
    from leanformer.measure.bench.peers import parse_peers

    try:
        return parse_peers(text)
    except LeanformerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


METRICS = {"prefill_tok_s": "prefill tokens/s", "ttft_ms": "time to first token (ms)"}


def bench_table(rows: list[dict], batches: list[int]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the bench table: one column per row (a failed peer's column is all "—"),
    then leanformer / reference ratios, the reference being the first peer that ran, else row 0."""
    labels = dict(METRICS) | {f"decode_tok_s_b{b}": f"decode tokens/s, batch {b}" for b in batches}
    labels |= {"ceiling_tok_s": "bandwidth ceiling, tokens/s (b=1)"}
    if 1 in batches:
        for r in rows:
            if "error" not in r:
                r["ceiling_pct"] = 100 * r["decode_tok_s_b1"] / r["ceiling_tok_s"]
        labels |= {"ceiling_pct": "decode b=1, % of that ceiling"}
    labels |= {"peak_rss_mb": "peak RSS (MB)", "size_mb": "weights (MB)", "load_s": "load time (s)"}
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["engine"] != "leanformer"), ok[0] if ok else None)
    ours = [r for r in ok if r["engine"] == "leanformer" and r is not ref]
    # each column names its variant: the label carries the recipe, the dtype is the activation precision
    header = ["metric", *(f"{r['label']} ({r.get('activation_dtype', r['dtype'])})" for r in rows)]
    header += [f"{r['label']} / {ref['label']}" for r in ours]
    body = []
    for key, label in labels.items():
        cells = [f"{r[key]:.1f}" if key in r else "—" for r in rows]
        body.append([label, *cells, *(f"{r[key] / ref[key]:.2f}×" for r in ours)])
    return header, body


def cmd_bench(args) -> None:
    import contextlib
    import dataclasses
    import tempfile

    if getattr(args, "tp", 1) > 1:  # under torchrun: the split model measured in place (cli/bench_tp.py)
        from leanformer.cli.bench_tp import footnote, run_split

        if (done := run_split(args)) is not None:  # rank 0
            _report(args, *done, [footnote(done[1])])
        return None
    if args.speculative:
        return cmd_speculative(args)

    from leanformer.measure.bench import peers as peer_rows
    from leanformer.measure.bench import runner
    from leanformer.measure.bench.turns import take_turns

    if args.json:
        check_output_file(args.json, input_paths(args))
    cfg = runner.BenchConfig(
        resolve_model(args.model), args.dtype, args.prompt_tokens, args.new_tokens, args.batch, args.repeats
    )
    cfg.keep_quantized = args.keep_quantized
    cfg.activations = args.activations
    cfg.calibration, cfg.calibration_samples = args.calibration, args.calibration_samples
    cfg.calibration_len = args.calibration_len
    if args.recipe:
        from leanformer.compress import load_recipe

        # a bad name, or a calibrated recipe without --calibration, fails here, before minutes of benchmarking
        check_calibration([load_recipe(name) for name in args.recipe if name != "none"], args.calibration)
    peers = list(dict.fromkeys([*(args.compare or []), *(args.peers or [])]))
    with contextlib.ExitStack() as stack:
        contenders = []
        for recipe in (None if r == "none" else r for r in (args.recipe or ["none"])):
            # GGUF blocks kept quantized (the default) is the only case --dequantize changes
            kept = cfg.keep_quantized and Path(cfg.model).suffix == ".gguf"
            label = "leanformer" + (" keep-quantized" if kept else "") + (f" +{recipe}" if recipe else "")
            contenders.append(runner.contender(dataclasses.replace(cfg, recipe=recipe), "leanformer", label))
        for peer in peers:
            print(f"preparing {peer} (converting the weights to its format) ...", file=sys.stderr, flush=True)
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="leanformer-peer-"))
            contenders.append(peer_rows.peer_contender(cfg, peer, work))
        how = "one after the other" if args.one_at_a_time else "taking turns round by round"
        names = ", ".join(c.row["label"] for c in contenders if "error" not in c.row)
        print(f"benchmarking {names}, each in its own process, {how} ...", file=sys.stderr, flush=True)
        rows = take_turns(cfg, contenders, together=not args.one_at_a_time)
    notes = [f"{r['label']}: not measured: {r['error']}" for r in rows if "error" in r]
    _report(args, cfg, rows, notes + round_notes(rows, cfg.batches))


def round_notes(rows: list[dict], batches: list[int]) -> list[str]:
    """Each of our rows against the reference round by round (engines that took turns together): the
    per-round decode ratio's median and range, what a drifting machine moves least."""
    ok = [r for r in rows if "error" not in r and "rounds" in r]
    ref = next((r for r in ok if r["engine"] != "leanformer"), ok[0] if ok else None)
    notes = []
    for r in ok:
        if r["engine"] != "leanformer" or r is ref or r.get("group") != ref.get("group"):
            continue
        for b in batches:
            key = f"decode_tok_s_b{b}"
            ratios = sorted(x / y for x, y in zip(r["rounds"][key], ref["rounds"][key]))
            if len(ratios) > 1:
                notes.append(
                    f"{r['label']} / {ref['label']}, decode batch {b}, per round: median "
                    f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f}× over {len(ratios)} rounds)"
                )
    return notes


def _report(args, cfg, rows: list[dict] | dict, notes: list[str]) -> None:
    """The table (and --json) of one bench run; `notes` printed under it."""
    from leanformer.measure.bench.peers import machine

    rows = [rows] if isinstance(rows, dict) else rows
    where = machine()
    header, body = bench_table(rows, cfg.batches)
    tp = f" --tp {args.tp}" if getattr(args, "tp", 1) > 1 else ""
    title = f"bench {args.model}{tp}: {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens"
    print(f"CPU: {where['summary']}")
    print_table(title, header, body)
    for note in notes:
        print(note)
    if args.json:
        doc = {"config": vars(cfg) | ({"tp": args.tp} if tp else {}), "machine": where, "results": rows}
        write_file_atomic(args.json, json.dumps(doc, indent=2))


def add_parser(sub) -> None:
    p = model_command(sub, "bench", "prefill / decode speed, TTFT, peak RSS, size")
    p.add_argument(
        "--compare", action="append", choices=["transformers"], help="same as --peers transformers"
    )
    p.add_argument(
        "--peers", type=peers_arg, default=None, metavar="NAME[,NAME...]",
        help="peer engines on the same weights, each in its own process, same run: llama.cpp (MODEL a .gguf), "
        "onnxruntime[:int8], ctranslate2[:int8], transformers; a missing or failing peer is a row with the reason",
    )  # fmt: skip
    p.add_argument(
        "--recipe", nargs="+", default=None,
        help="compression recipes (preset names or files) to bench, one row each; 'none' = uncompressed",
    )  # fmt: skip
    add_calibration_flags(p)
    p.add_argument("--prompt-tokens", type=ck.positive_int, default=128)
    p.add_argument("--new-tokens", type=ck.int_range(2), default=128, help="at least 2 (decode is timed)")
    p.add_argument("--batch", type=ck.positive_int, nargs="+", default=[1, 8])
    p.add_argument(
        "--repeats", type=ck.positive_int, default=3,
        help="rounds: in each, every engine runs a prefill, a TTFT and one generation per batch size, in turn",
    )  # fmt: skip
    p.add_argument(
        "--one-at-a-time", action="store_true",
        help="each engine alone, all its rounds, then the next (less memory: one model loaded at a time; "
        "a drifting machine's speed then lands on whichever engine ran during it)",
    )  # fmt: skip
    p.add_argument("--json", default=None)
    p.add_argument(
        "--speculative",
        nargs="+",
        default=None,
        metavar="prompt-lookup|draft:PATH",
        help="instead of the speed table: these methods vs plain decoding (tokens/s, acceptance) on an "
        "input-grounded and an open-ended workload; uses --new-tokens, --repeats (rounds), --prompts, --passages",
    )
    p.add_argument("--prompts", type=ck.positive_int, default=3, help="--speculative: prompts per workload")
    p.add_argument("--tp", type=ck.positive_int, default=1, metavar="N", help=TP_HELP)
    p.add_argument("--passages", default=None, help="--speculative: text file whose paragraphs are rewritten")
    p.set_defaults(func=cmd_bench)
