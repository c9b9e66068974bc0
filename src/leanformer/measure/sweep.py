"""A bench + eval sweep over compression recipes: what `leanformer report` plots and `optimize` searches.

For each recipe: quality against the uncompressed model on the same token windows (PPL, ΔPPL %, KLD,
top-1, measure/evaluate.py) in this process, and speed / memory from `bench` (each recipe in its own
process: decode tok/s per batch, prefill tok/s, peak RSS, weight size, bandwidth ceiling). Peers from
bench --peers are reference points (speed and memory; their quality is not measured here).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from leanformer.errors import LeanformerError

DEFAULT_RECIPES = ["none", "int8", "int8+head-int8", "int4-g32-dq8+head-int8", "int4", "int4-g128", "w8a8"]


@dataclass
class SweepConfig:
    model: str
    data: str
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    max_chars: int | None = 20_000  # a reduced eval set: ~5k tokens, 9 windows of 512 on SmolLM2
    window: int = 512
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 3
    peers: list[str] = field(default_factory=list)
    calibration: str | None = None  # text file for the recipes that calibrate (GPTQ, AWQ, Wanda, ...)
    calibration_samples: int = 16
    calibration_len: int = 512


def check_recipes(names: Sequence[str]) -> None:
    """Every recipe name or file loads (a typo fails before minutes of work)."""
    from leanformer.compress import load_recipe

    for name in names:
        if name != "none":
            load_recipe(name)


def eval_ids(tok, data: str, max_chars: int | None, window: int) -> torch.Tensor:
    """The evaluation token ids (wiki.test.raw protocol of PERF-FACTS, cut to max_chars)."""
    from leanformer.measure.evaluate import read_text, tokenize

    ids = tokenize(tok, read_text(data, max_chars))
    if len(ids) < window:
        raise LeanformerError(f"{data} gives {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids)


def quality(model, reference, ids: torch.Tensor, window: int, base_ppl: float | None = None) -> dict:
    """PPL, ΔPPL % against the reference's own PPL, mean KLD(reference ‖ model), top-1 agreement."""
    from leanformer.measure.evaluate import evaluate

    r = evaluate(model, ids, window, reference=reference, progress=False)
    base = base_ppl or r.reference_perplexity
    return {
        "ppl": r.perplexity,
        "delta_ppl_pct": 100 * (r.perplexity / base - 1),
        "kld": r.kld,
        "top1": r.top1_agreement,
    }


def compressed(base, recipe, calibration: torch.Tensor | None = None):
    """A compressed copy of `base` (`recipe`: a name, file or Recipe; "none" = the base itself);
    calibration: token ids [n, seq_len] for the recipes that calibrate."""
    from leanformer.compress import apply, load_recipe

    if recipe == "none":
        return base
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    return apply(copy.deepcopy(base), recipe, calibration=calibration, progress=False)


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """{"config", "machine", "recipes": [row per recipe], "peers": [bench rows]}; rows carry the
    quality keys of quality() and bench's speed / memory keys (or "error"). Quality is measured here,
    recipe by recipe; speed afterwards, every recipe and peer in its own process taking turns round by
    round (bench's scheme: measure/bench/turns.py), so the host's drift cannot reorder the front."""
    import contextlib
    import tempfile

    from leanformer.loading import load
    from leanformer.measure.bench import peers as peer_rows
    from leanformer.measure.bench import runner
    from leanformer.measure.bench.turns import take_turns

    check_recipes(cfg.recipes)
    base, tok = load(cfg.model, keep_quantized=False)  # the float baseline: recipes quantize it
    ids = eval_ids(tok, cfg.data, cfg.max_chars, cfg.window)
    calibration = None
    if cfg.calibration:
        from leanformer.measure.evaluate import calibration_ids

        calibration = calibration_ids(tok, cfg.calibration, cfg.calibration_samples, cfg.calibration_len)
    bench = runner.BenchConfig(
        cfg.model, "float32", cfg.prompt_tokens, cfg.new_tokens, cfg.batches, cfg.repeats
    )
    bench.calibration, bench.calibration_samples = cfg.calibration, cfg.calibration_samples
    bench.calibration_len = cfg.calibration_len
    rows, base_ppl, timed = [], None, []
    bar = tqdm(cfg.recipes, desc="sweep (quality)", unit="recipe", disable=not progress)
    for name in bar:
        bar.set_postfix(recipe=name)
        row: dict = {"recipe": name}
        try:
            with torch.inference_mode():
                q = quality(compressed(base, name, calibration), base, ids, cfg.window, base_ppl)
            base_ppl = base_ppl or q["ppl"] / (1 + q["delta_ppl_pct"] / 100)
            row |= q
            run = dataclasses.replace(bench, recipe=None if name == "none" else name)
            timed.append((row, runner.contender(run, "leanformer", name)))
        except Exception as e:  # one recipe failing (a calibrated one without data, ...) is a row
            row["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rows.append(row)
    del base
    with contextlib.ExitStack() as stack:
        peers = []
        for peer in cfg.peers:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="leanformer-peer-"))
            peers.append(peer_rows.peer_contender(bench, peer, work))
        speeds = take_turns(bench, [c for _, c in timed] + peers)
    for (row, _), speed in zip(timed, speeds):
        row |= {k: v for k, v in speed.items() if k not in ("engine", "dtype", "label")}
    n_tokens = len(ids)
    return {
        "config": dataclasses.asdict(cfg) | {"eval_tokens": n_tokens, "base_ppl": base_ppl},
        "machine": peer_rows.machine(),
        "recipes": rows,
        "peers": speeds[len(timed) :],
    }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed: higher is better, loss: lower is better) that no other point
    beats on both, in order of speed; NaN points are never on the front."""
    ok = [i for i, (s, q) in enumerate(points) if not (math.isnan(s) or math.isnan(q))]
    front = []
    for i in ok:
        s, q = points[i]
        dominated = any(
            points[j][0] >= s and points[j][1] <= q and points[j] != points[i] for j in ok if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])
