"""`leanformer report`: a bench + eval sweep over recipes (or an earlier one's results.json) rendered as
a Markdown report with PNG plots: speed vs ΔPPL / KLD with the Pareto front, memory and size per recipe."""

from __future__ import annotations

import sys
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli.common import add_calibration_flags, check_calibration, input_paths
from leanformer.errors import LeanformerError
from leanformer.hub import resolve_model


def cmd_report(args) -> None:
    from leanformer.compress import load_recipe
    from leanformer.measure import report
    from leanformer.measure.sweep import DEFAULT_RECIPES, SweepConfig, check_recipes, run_sweep

    out = report.check_report_dir(args.output, args.overwrite, input_paths(args))
    if args.from_results:
        if args.recipes or args.peers:
            raise LeanformerError("--from re-renders an earlier sweep; drop --recipes / --peers")
        results = report.read_results(args.from_results)
    else:
        if not args.data:
            raise LeanformerError("--data FILE is required to measure quality (e.g. wiki.test.raw)")
        if not Path(args.data).expanduser().is_file():
            raise LeanformerError(f"data file not found: {args.data}")
        recipes = args.recipes or list(DEFAULT_RECIPES)
        check_recipes(
            recipes
        )  # a bad name, or a calibrated recipe without --calibration, fails before the sweep
        check_calibration([load_recipe(r) for r in recipes if r != "none"], args.calibration)
        cfg = SweepConfig(resolve_model(args.model), args.data, recipes, args.max_chars or None, args.window)
        cfg.calibration, cfg.calibration_samples = args.calibration, args.calibration_samples
        cfg.calibration_len = args.calibration_len
        cfg.batches, cfg.prompt_tokens, cfg.new_tokens = args.batch, args.prompt_tokens, args.new_tokens
        cfg.repeats, cfg.peers = args.repeats, args.peers or []
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
        results = run_sweep(cfg) | {"loadavg": " ".join(load)}
    path = report.write_report(results, out)
    print(path)
    print(f"report written: {path}", file=sys.stderr)


def add_parser(sub) -> None:
    from leanformer.cli.bench import peers_arg

    p = sub.add_parser("report", help="bench + eval sweep over recipes → Markdown report with Pareto plots")
    p.add_argument("model", help="path or known name (e.g. smollm2); with --from only the report's title")
    p.add_argument("-o", "--output", required=True, help="report folder (report.md, results.json, *.png)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty folder that is not a report")
    p.add_argument(
        "--recipes", nargs="+", default=None, help="presets or recipe files; 'none' = uncompressed"
    )
    p.add_argument("--from", dest="from_results", default=None, help="re-render an earlier results.json")
    p.add_argument("--data", default=None, help="text file for ΔPPL / KLD (e.g. wiki.test.raw)")
    p.add_argument("--max-chars", type=ck.non_negative_int, default=20_000, help="eval text cut (0 = all)")
    p.add_argument("--window", type=ck.int_range(2), default=512)
    add_calibration_flags(p)
    p.add_argument("--peers", type=peers_arg, default=None, metavar="NAME[,NAME...]", help="as in bench")
    p.add_argument("--batch", type=ck.positive_int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=ck.positive_int, default=128)
    p.add_argument("--new-tokens", type=ck.int_range(2), default=64)
    p.add_argument("--repeats", type=ck.positive_int, default=3)
    p.set_defaults(func=cmd_report)
