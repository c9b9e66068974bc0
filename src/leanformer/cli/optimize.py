"""`leanformer optimize`: search recipes for the fastest (or smallest) one within a ΔPPL budget, confirm
the candidates by measuring them beside the presets, print the Pareto front, save the winner."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.cli.common import add_calibration_flags, check_calibration, input_paths, print_table
from leanformer.errors import LeanformerError
from leanformer.hub import resolve_model


def percent(text: str) -> float:
    """--max-ppl-increase: '2%' or '2' (percent), in (0, 1000]."""
    value = ck.float_range(0.0, 1000.0, low_open=True)(text.strip().removesuffix("%"))
    return value


def cmd_optimize(args) -> None:
    import torch

    from leanformer.loading import load, save
    from leanformer.measure.optimize import Search, recipe_of
    from leanformer.measure.sweep import compressed, eval_ids
    from leanformer.outputs import check_output_dir, check_output_file, write_file_atomic

    if not Path(args.data).expanduser().is_file():
        raise LeanformerError(f"data file not found: {args.data}")
    check_calibration([], args.calibration)  # a missing file, before minutes of work
    if args.output:
        check_output_dir(args.output, args.overwrite, input_paths(args))
    if args.json:
        check_output_file(args.json, input_paths(args))
    model_path = resolve_model(args.model)
    base, tok = load(model_path, keep_quantized=False)  # a GGUF dequantized: the float baseline
    ids = eval_ids(tok, args.data, args.max_chars or None, args.window)
    search = Search(base, ids, args.max_ppl_increase, args.objective, args.window, args.top, args.rounds)
    if args.calibration:  # the calibrated presets (GPTQ, AWQ) join the search
        from leanformer.measure.evaluate import calibration_ids

        search.calibration = calibration_ids(
            tok, args.calibration, args.calibration_samples, args.calibration_len
        )
    torch.manual_seed(0)
    candidates = search.estimate()
    for line in search.log:
        print(f"  {line}", file=sys.stderr)
    measured = search.confirm(candidates)
    best = search.winner(measured)
    front = {c.name for c in search.front(measured)}
    key = {"decode": "decode_tok_s_b1", "prefill": "prefill_tok_s", "memory": "size_mb"}[args.objective]
    header = ["recipe", "ΔPPL % (est.)", "ΔPPL %", "KLD", key.replace("_", " "), "weights MB", ""]
    rows = []
    for c in sorted(measured, key=lambda c: -search.score(c)):
        m, est = c.measured, c.estimate.get("delta_ppl_pct")
        mark = ("winner " if c is best else "") + ("★ front" if c.name in front else "")
        over = " (over budget)" if m["delta_ppl_pct"] > args.max_ppl_increase else ""
        rows.append([c.name, "—" if est is None else f"{est:+.2f}", f"{m['delta_ppl_pct']:+.2f}{over}",
                     f"{m['kld']:.4f}", f"{m[key]:.1f}", f"{m['size_mb']:.1f}", mark])  # fmt: skip
    title = f"optimize {args.model}: ΔPPL ≤ {args.max_ppl_increase:g}%, objective {args.objective} ({len(ids)} eval tokens)"
    print_table(title, header, rows)
    if best is None:
        raise LeanformerError(
            f"no recipe measured within ΔPPL ≤ {args.max_ppl_increase:g}%; raise the budget"
        )
    recipe = recipe_of(best)
    print(f"winner: {best.name}: ΔPPL {best.measured['delta_ppl_pct']:+.2f}%, {key} {best.measured[key]:.1f}")
    if args.json:
        doc = {"winner": best.name, "recipe": recipe.to_dict(), "log": search.log,
               "measured": [{"name": c.name, "estimate": c.estimate, **c.measured} for c in measured]}  # fmt: skip
        write_file_atomic(args.json, json.dumps(doc, indent=2))
    if args.output:
        model = compressed(base, copy.deepcopy(recipe), search.calibration) if best.recipe != "none" else base
        save(model, tok, args.output, overwrite=args.overwrite)
        print(f"saved to {args.output}")
    else:
        print(json.dumps(recipe.to_dict(), indent=2))


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="the fastest recipe within a ΔPPL budget, measured; saves the winner")
    p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin) or a known name, e.g. smollm2")
    p.add_argument("--max-ppl-increase", type=percent, required=True, metavar="PCT",
                   help="budget on perplexity increase, e.g. 2%% or 2")  # fmt: skip
    p.add_argument("--objective", choices=["decode", "prefill", "memory"], default="decode")
    p.add_argument("--data", required=True, help="text file for ΔPPL (e.g. wiki.test.raw)")
    p.add_argument("--max-chars", type=ck.non_negative_int, default=20_000, help="eval text cut (0 = all)")
    p.add_argument("--window", type=ck.int_range(2), default=512)
    add_calibration_flags(p)  # with it, gptq-int4 / awq-int4 / gptq-int8 are measured among the presets
    p.add_argument("--top", type=ck.positive_int, default=12, help="layers attributed per scheme")
    p.add_argument("--rounds", type=ck.positive_int, default=3, help="rotating speed rounds")
    p.add_argument("-o", "--output", default=None, help="save the winner here (a leanformer save)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", default=None, help="write every measured candidate and the winner")
    p.set_defaults(func=cmd_optimize)
