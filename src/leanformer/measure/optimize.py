"""`leanformer optimize`: the fastest (or smallest) recipe whose measured ΔPPL stays within a budget.

Search space: weight schemes (int8, int8 + int8 head, int4 at group 32 with 8-bit scales / 64 / 128 +
int8 head), each with a per-layer `ignore` list whose layers drop to int8 instead of int4 (a per-layer
mix), the int8 KV cache on top, and every preset (compress/recipe.py) that needs no calibration data.

1. **Cheap estimate.** Each int4 scheme is applied whole once: its ΔPPL and mean KLD on the (reduced)
   eval set, and `eval --per-layer`'s attribution (measure/diagnose.py: KLD of the model with only that
   layer quantized) for the `top` layers with the largest local error. Keeping layer i at int8 is
   estimated to remove its share of the KLD: ΔPPL(k) ≈ ΔPPL(all) × (1 − Σ_{i ≤ k} KLD_i / KLD(all)).
   Its cost in speed: decode time per token = the scheme's measured step + the extra bytes at the
   bandwidth implied by the fp32 and int8 steps (memory objective: the bytes themselves).
2. **Confirm by measuring.** Per scheme, the fewest layers whose estimate meets 80% of the budget (and
   one more), plus the int8 KV cache on the best of them, are built and measured like the presets:
   ΔPPL / KLD on the same windows, decode b=1 tok/s in rotating rounds in one process (ratios within
   one run), prefill tok/s, weight bytes.
3. The Pareto front (speed vs ΔPPL) of everything measured is printed; the winner is the best measured
   objective within the budget, so it is at least as fast as every preset within the budget, measured
   side by side. The caller saves it through leanformer.save (the recipe goes with it).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from leanformer.compress import Recipe, load_recipe
from leanformer.compress.config import Int4WeightOnly, Int8WeightOnly, KVCache
from leanformer.errors import LeanformerError
from leanformer.measure.sweep import compressed, pareto_front, quality

OBJECTIVES = ("decode", "prefill", "memory")
# presets that need no calibration data and prune nothing (pruning needs data and changes the model)
PRESETS = ["none", "int8", "int8+head-int8", "int4", "int4-g32", "int4-g32-dq8", "int4-g32-dq8+head-int8"]
PRESETS += ["int4-g128", "bf16", "bf16+head-bf16", "f16", "f16+head-f16", "w8a8", "kv-int8", "int8+kv-int8"]
CALIBRATED_PRESETS = ["gptq-int4", "awq-int4", "gptq-int8"]  # measured too when calibration text is given
INT4_SCHEMES = {"int4-g32-dq8": (32, 8), "int4-g64": (64, None), "int4-g128": (128, None)}


def int4_mix(group: int, scale_bits: int | None, int8_layers: list[str]) -> Recipe:
    """int4 everywhere except `int8_layers` and the LM head, which are int8 (one int8 table for a tied
    embedding)."""
    keep = ["lm_head", *int8_layers]
    return Recipe(
        [
            Int4WeightOnly(group_size=group, scale_bits=scale_bits, ignore=keep),
            Int8WeightOnly(targets=keep, ignore=[]),
        ]
    )


@dataclass
class Candidate:
    name: str
    recipe: Recipe | str
    estimate: dict = field(default_factory=dict)  # est. delta_ppl_pct, step_s, bytes
    measured: dict = field(default_factory=dict)  # quality() keys + decode_tok_s_b1, prefill_tok_s, size_mb


def _bytes(model) -> int:
    from leanformer.measure.bench.runner import _nbytes

    return _nbytes(model)


def _decode_tok_s(model, prompt_tokens: int, new_tokens: int) -> float:
    from leanformer.measure.bench.paired import decode_tok_s

    return decode_tok_s(model, 1, prompt_tokens, new_tokens)


def _prefill_tok_s(model, prompt_tokens: int, repeats: int = 3) -> float:
    ids = torch.randint(
        10, model.args.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    at = torch.full((1,), prompt_tokens - 1)
    model(ids, logits_at=at)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids, logits_at=at)
        times.append(time.perf_counter() - t)
    return prompt_tokens / statistics.median(times)


@dataclass
class Search:
    base: torch.nn.Module
    ids: torch.Tensor  # eval token ids
    budget_pct: float  # max ΔPPL, %
    objective: str = "decode"
    window: int = 512
    top: int = 12  # layers attributed end to end per scheme
    rounds: int = 3  # rotating speed rounds
    prompt_tokens: int = 64
    new_tokens: int = 32
    progress: bool = True
    base_ppl: float | None = None
    log: list[str] = field(default_factory=list)
    calibration: torch.Tensor | None = None  # token ids [n, seq_len]: the calibrated presets join the search

    def _quality(self, model) -> dict:
        q = quality(model, self.base, self.ids, self.window, self.base_ppl)
        self.base_ppl = self.base_ppl or q["ppl"] / (1 + q["delta_ppl_pct"] / 100)
        return q

    def estimate(self) -> list[Candidate]:
        """Stage 1: per-layer sensitivity per int4 scheme → the per-layer mixes worth measuring."""
        from leanformer.measure.diagnose import per_layer_errors

        n_win = min(2, len(self.ids) // self.window)
        windows = self.ids[: n_win * self.window].view(n_win, self.window)
        with torch.inference_mode():
            t_fp32 = 1 / _decode_tok_s(self.base, self.prompt_tokens, self.new_tokens)
            int8 = compressed(self.base, "int8+head-int8")
            t_int8 = 1 / _decode_tok_s(int8, self.prompt_tokens, self.new_tokens)
            # seconds per extra byte read per token, from fp32 vs int8 (both bandwidth-bound here)
            per_byte = max(t_fp32 - t_int8, 1e-9) / max(_bytes(self.base) - _bytes(int8), 1)
            del int8
        out = []
        bar = tqdm(INT4_SCHEMES.items(), desc="estimate", unit="scheme", disable=not self.progress)
        for name, (group, bits) in bar:
            # Linears whose width the group does not divide stay int8 (a padded group would cost bits and a
            # pad per call): the scheme is still measured on the rest
            linears = [
                (n, m)
                for n, m in self.base.named_modules()
                if isinstance(m, torch.nn.Linear) and n != "lm_head"
            ]
            misfits = [n for n, m in linears if m.in_features % group]
            if len(misfits) == len(linears):
                self.log.append(f"{name}: skipped (group {group} divides no Linear's width)")
                continue
            if misfits:
                self.log.append(
                    f"{name}: {len(misfits)} Linears whose width {group} does not divide stay int8"
                )
            try:
                full = compressed(self.base, int4_mix(group, bits, misfits))
            except LeanformerError as e:  # e.g. no Linear left for int4
                self.log.append(f"{name}: skipped ({e})")
                continue
            with torch.inference_mode():
                q, step = self._quality(full), 1 / _decode_tok_s(full, self.prompt_tokens, self.new_tokens)
                rows = per_layer_errors(full, self.base, windows, top=self.top, progress=False)
            klds = [
                (r.name, r.kld_alone)
                for r in rows
                if r.kld_alone is not None and r.name != "lm_head" and r.name not in misfits
            ]
            total = sum(k for _, k in klds) or 1e-12
            kld_all = max(q["kld"], total)  # the layers' KLDs add up to about the whole model's
            size = _bytes(full)
            chosen, cum = [], 0.0
            for k in range(len(klds) + 1):
                layers = [n for n, _ in klds[:k]]
                extra = sum(self.base.get_submodule(n).weight.numel() for n in layers)
                est = {
                    "delta_ppl_pct": q["delta_ppl_pct"] * (1 - cum / kld_all),
                    "step_s": step + per_byte * extra * 0.5,  # int8 reads ~0.5 B more per weight than int4
                    "bytes": size + extra * 0.5,
                }
                n8 = len(layers) + len(misfits)
                chosen.append(
                    Candidate(
                        f"{name}+head-int8" + (f"+{n8}int8" if n8 else ""),
                        int4_mix(group, bits, misfits + layers),
                        est,
                    )
                )
                cum += klds[k][1] if k < len(klds) else 0.0
            self.log.append(
                f"{name}: ΔPPL {q['delta_ppl_pct']:+.2f}% KLD {q['kld']:.4f}; top layers "
                + ", ".join(f"{n.removeprefix('model.')} {k:.4f}" for n, k in klds[:4])
            )
            del full
            fits = [c for c in chosen if c.estimate["delta_ppl_pct"] <= 0.8 * self.budget_pct]
            k0 = chosen.index(fits[0]) if fits else len(chosen) - 1
            out += chosen[k0 : k0 + 2]  # the fewest layers that fit, and one more for safety
        if not out:
            return out
        best = min(out, key=self._est_cost)
        kv = Recipe([*copy.deepcopy(best.recipe.stages), KVCache(dtype="int8")])
        out.append(Candidate(best.name + "+kv-int8", kv, dict(best.estimate)))
        return out

    def _est_cost(self, c: Candidate) -> float:
        over = c.estimate["delta_ppl_pct"] > self.budget_pct
        return (over, c.estimate["bytes"] if self.objective == "memory" else c.estimate["step_s"])

    def confirm(self, candidates: list[Candidate]) -> list[Candidate]:
        """Stage 2: build and measure the presets and the candidates side by side."""
        presets = PRESETS + (CALIBRATED_PRESETS if self.calibration is not None else [])
        every = [Candidate(p, p) for p in presets]
        every += [c for c in candidates if c.name not in presets]  # k = 0 of a scheme may be a preset
        models = {}
        for c in tqdm(every, desc="quality", unit="recipe", disable=not self.progress):
            try:
                recipe = c.recipe if isinstance(c.recipe, str) else copy.deepcopy(c.recipe)
                model = compressed(self.base, recipe, self.calibration)
            except LeanformerError as e:  # a preset this model's shapes refuse
                c.measured = {"error": str(e)}
                continue
            with torch.inference_mode():
                c.measured = self._quality(model) | {"size_mb": _bytes(model) / 2**20}
            models[c.name] = model
        every = [c for c in every if c.name in models]
        speeds: dict[str, list[float]] = {c.name: [] for c in every}
        order = [c.name for c in every]
        with torch.inference_mode():
            for m in models.values():  # warm-up: kernels, packed weights, decode plans
                _decode_tok_s(m, 8, 2)
            for r in tqdm(range(self.rounds), desc="speed rounds", unit="round", disable=not self.progress):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    if self.objective == "prefill":
                        speeds[name].append(_prefill_tok_s(models[name], 4 * self.prompt_tokens, 1))
                    else:
                        speeds[name].append(_decode_tok_s(models[name], self.prompt_tokens, self.new_tokens))
        for c in every:
            key = "prefill_tok_s" if self.objective == "prefill" else "decode_tok_s_b1"
            c.measured[key] = statistics.median(speeds[c.name])
        return every

    def score(self, c: Candidate) -> float:
        """Higher is better."""
        m = c.measured
        if self.objective == "memory":
            return -m["size_mb"]
        return m["prefill_tok_s" if self.objective == "prefill" else "decode_tok_s_b1"]

    def winner(self, measured: list[Candidate]) -> Candidate | None:
        ok = [c for c in measured if c.measured["delta_ppl_pct"] <= self.budget_pct]
        return max(ok, key=self.score) if ok else None

    def front(self, measured: list[Candidate]) -> list[Candidate]:
        return [
            measured[i]
            for i in pareto_front([(self.score(c), c.measured["delta_ppl_pct"]) for c in measured])
        ]


def recipe_of(c: Candidate) -> Recipe:
    return load_recipe(c.recipe) if isinstance(c.recipe, str) else c.recipe
