"""Prompt lookup's draft policy for one sequence: how many drafts to verify in the next forward.

Two measured quantities decide it:
- what a verification forward of m chained rows costs relative to a one-row step (`verify_costs`:
  timed once per model and setting, then reused by every request). On SmolLM2 int4, AVX2, 1 thread the
  int8-activation GEMV is compute bound past one row: ~1.1x at 2 rows, ~1.4x at 3, ~2x at 5, ~3.6x at
  9, so 8 drafts pay only when nearly all of them survive;
- how likely each draft is to survive (LookupPolicy): a draft continues a match of the text's last L
  tokens (L: the longest suffix that occurred before, ngram.SuffixIndex), and once j drafts survived,
  the (j+1)-th continues a match of L + j tokens. Survival is therefore kept per match length
  (1..CAP), learnt per request as decayed counts (from LOOKUP_PRIOR). On SmolLM2 rewrites of wikitext
  paragraphs: 33% at L = 1, 70% at L = 2, ~90% from L = 3 on; on open-ended stories 21% at L = 1.

The k (0 = a plain step) with the most expected tokens per unit of cost wins:
    E(k) = 1 + sum_{j=1..k} prod_{i<j} a(L + i),   rate(k) = E(k) / cost(k + 1),   cost(1) = 1.
While plain, the policy still learns a(L) for free: the caller reports whether the first draft would
have been the token the plain step chose.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from leanformer.models.kv_cache import KVCache

CAP = 8  # match lengths past this behave alike (~90% survival on rewrites)
# Prompt lookup's survival per match length before a request has shown its own (the first steps):
# SmolLM2 rewrites of 10 wikitext paragraphs kept 34% of first drafts at L = 1, 73% at L = 2, 83-92%
# from 3 on; open-ended stories 20% at L = 1, ~40% at 2-3. A flat 1 in 2 drafted after 1-token matches
# and held back after long ones: replaying those outputs through the policy, this prior gives 1.58x
# plain (mean of 10) instead of 1.55x on rewrites, 1.05x on stories either way. Lengths 3.. take CAP's.
LOOKUP_PRIOR = {1: 0.3, 2: 0.6, CAP: 0.8}


class LookupPolicy:
    """Draft length per step from calibrated costs and per-match-length survival (module docstring)."""

    DECAY = 0.9

    def __init__(self, max_draft: int, costs: list[float], prior: dict[int, float] | None = None) -> None:
        """prior: survival per match length before any evidence (LOOKUP_PRIOR; default 1 in 2 for all),
        weighted as two judged drafts."""
        self.max_draft = max_draft
        self.costs = costs  # costs[m - 1]: a forward of m rows, in one-row steps (costs[0] == 1)
        a = prior or {}
        # L -> [decayed kept, decayed judged]
        self.counts = {n: [2.0 * a.get(n, a.get(CAP, 0.5)), 2.0] for n in range(1, CAP + 1)}
        self.fallbacks = 0  # times drafting stopped paying for this request
        self._drafting = False

    def alpha(self, n: int) -> float:
        hits, trials = self.counts[min(max(n, 1), CAP)]
        return min(hits / trials, 0.999)

    def draft_len(self, n: int, available: int) -> int:
        """Drafts to verify after a match of n tokens with `available` drafts (0: a plain step)."""
        top = min(available, self.max_draft, len(self.costs) - 1)
        best_k, best, expected, survive = 0, 1.0, 1.0, 1.0
        for k in range(1, top + 1):
            survive *= self.alpha(n + k - 1)
            expected += survive
            rate = expected / self.costs[k]
            if rate > best:
                best_k, best = k, rate
        if self._drafting and best_k == 0:
            self.fallbacks += 1
        self._drafting = best_k > 0
        return best_k

    def _judge(self, n: int, kept: bool) -> None:
        c = self.counts[min(max(n, 1), CAP)]
        c[0] = self.DECAY * c[0] + kept
        c[1] = self.DECAY * c[1] + 1

    def observe(self, n: int, first_draft_kept: bool) -> None:
        """A plain step after a match of n tokens: would its first draft have been kept?"""
        self._judge(n, first_draft_kept)

    def round(self, n: int, k: int, accepted: int) -> None:
        """A verification of k drafts after a match of n tokens kept `accepted` of them: draft j (0-based)
        was judged at match length n + j, up to the first rejected one."""
        for j in range(min(accepted + 1, k)):
            self._judge(n + j, j < accepted)


@torch.inference_mode()
def verify_costs(model: nn.Module, rows: int, repeats: int = 8, context: int = 128) -> list[float]:
    """Cost of a decode forward of 1..rows chained rows in one-row steps, timed once per model, thread
    count, activation and KV setting (kept on the model; ~1 s for SmolLM2 at 9 rows).

    Row counts 1, 2, 3, 5, 9, 16 (up to `rows`, and `rows` itself) are timed in `repeats` passes; each
    count's cost is the median over passes of its time over the same pass's one-row time (neighbours in
    time share the machine's load; the median drops a pass the OS preempted, which on a shared machine
    a fastest-time rule did not: 1.1-1.4x at 2 rows under load 7). The counts between are interpolated
    and the costs made non-decreasing. The scratch cache's keys are
    zeros at positions 0..context: attention reads as much as a short prompt's."""
    key = (
        torch.get_num_threads(),
        getattr(model, "decode_activations", "auto"),
        getattr(model, "kv_cache_dtype", None),
        getattr(model, "fused_decode", None),
    )
    rows = min(rows, model.args.max_position_embeddings)  # very few positions: fewer drafts
    known = model.__dict__.setdefault("_verify_costs", {})
    if key in known and len(known[key]) >= rows:
        return known[key][:rows]
    cache = KVCache.for_model(model, 1, context + rows + 1)
    context = max(0, min(context, cache.max_seq - rows))
    one = torch.tensor([0])
    timed = sorted({m for m in (1, 2, 3, 5, 9, 16) if m < rows} | {rows})
    ratios: dict[int, list[float]] = {m: [] for m in timed}
    for rep in range(repeats + 1):
        seconds = {}
        for m in timed:
            cache.set_length(one, torch.tensor([context]))
            ids = torch.zeros(m, 1, dtype=torch.long)
            t = time.perf_counter()
            if m == 1:  # a plain step's own path
                model(ids, cache=cache, slots=one)
            else:
                model(ids, cache=cache.chain(0), slots=torch.zeros(m, dtype=torch.long))
            seconds[m] = time.perf_counter() - t
        if rep > 0:  # the first pass builds the fused decode stack
            for m in timed:
                ratios[m].append(seconds[m] / seconds[1])
    ratio = {m: statistics.median(r) for m, r in ratios.items()}
    costs, top = [], 1.0
    for m in range(1, rows + 1):
        lo = max(x for x in timed if x <= m)
        hi = min(x for x in timed if x >= m)
        c = ratio[lo] if hi == lo else ratio[lo] + (ratio[hi] - ratio[lo]) * (m - lo) / (hi - lo)
        top = max(top, c)
        costs.append(top)
    known[key] = costs
    return costs


class DraftPolicy:
    """A draft model's length per step (speculative_decode, one request), priced in one-row target steps.

    Costs are known before the request: verify_costs (a forward of m chained rows) and draft_cost (one
    draft forward), both timed once per model; only the survival rate `a` is learnt (a decayed count,
    prior 1 in 2). k drafts cost k * draft + costs[k] and yield E(k) = (1 - a^(k+1)) / (1 - a) tokens;
    the k with the most tokens per step wins, k = 0 when none beats a plain step. An expensive draft
    (layer skip: ~0.5 of a step per draft on SmolLM2, so a needs ~0.85 to pay) rarely drafts: then it
    probes with one draft. The first probe comes at once; a kept probe is usually a gain (2 tokens for
    draft + costs[1] < 2 steps) and is followed by another at once; a rejected one wastes
    draft + costs[1] - 1 steps, so the next waits until that loss is at most PROBE_BUDGET of the plain
    steps between, and each further rejection doubles the wait. A draft that cannot pay even when
    always right (`hopeless`) never runs. Open-ended SmolLM2 with layer-skip:10 (a draft 0.56 of a step, 2 rows
    1.09): a rejected probe wastes 0.65 steps, probes come at steps 1, ~45, ~135, ~310: ~1% of 128
    tokens, ~0.3% of 1000 (was a 2-draft probe after 3 timed plain steps, then 1-draft ones: ~2.4%)."""

    DECAY, PROBE_BUDGET, MAX_PAUSE = 0.9, 0.015, 1024  # the budget: a share of the plain steps

    def __init__(self, max_draft: int, costs: list[float], draft: float) -> None:
        self.max_draft = max_draft
        self.costs = costs  # costs[m - 1]: a verification forward of m rows, in one-row steps
        self.draft = draft  # one draft forward, in one-row target steps
        self.counts = [1.0, 2.0]  # [decayed drafts kept, decayed drafts judged]
        self.fallbacks = 0  # times drafting stopped paying for this request
        self._drafting = False
        two = costs[min(1, len(costs) - 1)]  # a one-draft verification
        self.loss = max(0.0, draft + two - 1)  # steps a rejected probe wastes
        self.kept_loss = max(0.0, draft + two - 2)  # and a kept one (> 0: the draft is too dear)
        # a draft that cannot pay even when always right (k + 1 tokens for k drafts + k + 1 rows) is never
        # run: e.g. SmolLM2 int4 drafting for its fp32 dequantization costs ~1 step per draft on AVX2
        self.hopeless = all(
            k + 1 <= k * draft + costs[k] for k in range(1, min(max_draft, len(costs) - 1) + 1)
        )
        self.pause = 1  # plain steps before the next probe
        self.idle = 0  # plain steps since the last draft
        self._probe = False

    @property
    def alpha(self) -> float:
        return min(self.counts[0] / self.counts[1], 0.999)

    def draft_len(self, available: int) -> int:
        """Drafts for the next step (0: a plain step); `available`: how many may still be emitted."""
        top = min(available, self.max_draft, len(self.costs) - 1)
        if top < 1 or self.hopeless:
            return 0
        a, best_k, best = self.alpha, 0, 1.0
        for k in range(1, top + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (k * self.draft + self.costs[k])
            if rate > best:
                best_k, best = k, rate
        self._probe = False
        if best_k > 0:
            self._drafting, self.idle = True, 0
            return best_k
        if self._drafting:
            self.fallbacks += 1
            self._drafting, self.pause = False, self._wait(1)
        self.idle += 1
        if self.idle < self.pause:
            return 0
        self.idle, self._probe = 0, True
        return 1

    def _wait(self, previous: int) -> int:
        """Plain steps before the next probe after a rejection: loss / budget, doubling while rejected."""
        return min(self.MAX_PAUSE, max(math.ceil(self.loss / self.PROBE_BUDGET), 2 * previous))

    def round(self, k: int, accepted: int) -> None:
        """k drafts were verified and `accepted` of them kept (the first rejected one, if any, is judged)."""
        self.counts[0] = self.DECAY * self.counts[0] + accepted
        self.counts[1] = self.DECAY * self.counts[1] + accepted + (accepted < k)
        if not self._probe:
            return
        if accepted < k:
            self.pause = self._wait(self.pause if self.pause > 1 else 0)
        else:  # kept: probe again at once if that pays by itself, else after a budgeted wait
            self.pause = max(1, math.ceil(self.kept_loss / self.PROBE_BUDGET))


@torch.inference_mode()
def draft_cost(model: nn.Module, draft: nn.Module, repeats: int = 8, context: int = 128) -> float:
    """One draft forward over one target forward (both one-row decode steps on scratch caches at
    `context`), the median over `repeats` alternating passes (~0.2 s for SmolLM2); kept on the draft per
    target and setting (a LayerSkip view is kept per model: speculative.early_exit)."""
    key = (id(model), torch.get_num_threads(), getattr(model, "decode_activations", "auto"))
    known = draft.__dict__.setdefault("_draft_costs", {})
    if key in known:
        return known[key]
    one, ids = torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long)
    caches = [KVCache.for_model(m, 1, context + 1) for m in (model, draft)]
    ratios = []
    for rep in range(repeats + 1):
        seconds = []
        for m, cache in zip((model, draft), caches):
            cache.set_length(one, torch.tensor([min(context, cache.max_seq - 1)]))
            t = time.perf_counter()
            m(ids, cache=cache, slots=one)
            seconds.append(time.perf_counter() - t)
        if rep > 0:  # the first pass builds the fused decode stacks
            ratios.append(seconds[1] / seconds[0])
    known[key] = statistics.median(ratios)
    return known[key]


class Controller:
    """Draft length from a cost model measured on this request, so speculation runs only where it pays.

    A verification of k drafts costs plain + k * row seconds (the decode kernels are partly compute
    bound: on SmolLM2 int4 8 rows cost ~4x one row, not ~1x) and yields (1 - a^(k+1)) / (1 - a) tokens
    on average when each draft survives with probability a. The k with the most tokens per second wins;
    k = 0 (a plain step) when no k beats plain decoding. `a` is kept per key: prompt lookup keys it by
    the length of the n-gram that matched (a 3-gram match in a passage being rewritten is kept far more
    often than a 1-gram one: on SmolLM2 rewrites of wikitext paragraphs the next token matched 88% of
    3-gram, 63% of 2-gram and 29% of 1-gram lookups). `a` is a decayed count; `plain` and `row` are
    medians of recent samples (the machine may be shared). While plain, prompt lookup still learns `a`
    for free (observe); a draft model re-probes with one draft after 16, 32, 64, ... plain steps."""

    DECAY, PROBE, FIRST_PAUSE, MAX_PAUSE, WINDOW = 0.9, 3, 16, 256, 15
    PROBE_BUDGET = 0.02  # re-probes may cost at most this share of the plain steps between them

    def __init__(self, max_draft: int) -> None:
        self.max_draft = max_draft
        self.plain_s: float | None = None  # seconds per plain step (median of recent ones)
        self.row_s: float | None = None  # extra seconds per verified draft (median of recent ones)
        self._plain: list[float] = []
        self._row: list[float] = []
        self.counts: dict = {}  # key -> [decayed drafts kept, decayed drafts judged]
        self.plain_steps = 0
        self.idle = 0  # plain steps since speculation last paid
        self.next_probe = self.FIRST_PAUSE
        self.fallbacks = 0  # times speculation switched off for this request

    def _counts(self, key) -> list[float]:
        return self.counts.setdefault(key, [1.0, 2.0])  # prior a = 0.5

    def alpha_of(self, key=None) -> float:
        hits, trials = self._counts(key)
        return min(hits / trials, 0.999)

    @property
    def alpha(self) -> float:
        return self.alpha_of(None)

    def rate(self, k: int, key=None) -> float:
        """Expected tokens per second with k drafts."""
        a = self.alpha_of(key)
        return (1 - a ** (k + 1)) / (1 - a) / (self.plain_s + self.row_s * k)

    def draft_len(self, key=None, limit: int | None = None) -> int:
        """0: take a plain step. limit: drafts available (prompt lookup's match may be short)."""
        top = self.max_draft if limit is None else min(limit, self.max_draft)
        if self.plain_s is None or self.plain_steps < self.PROBE or top < 1:
            return 0
        if self.row_s is None:
            return min(2, top)  # measure what a verified row costs
        best = max(range(top + 1), key=lambda k: self.rate(k, key))
        if best > 0:
            self.idle = 0
            return best
        if self.idle == 0:
            self.fallbacks += 1
            # a rejected one-draft probe costs ~row_s more than a plain step: an expensive draft (layer
            # skip: ~0.8 of a step per draft on SmolLM2) waits longer before its first re-probe
            wait = math.ceil(self.row_s / (self.plain_s * self.PROBE_BUDGET))
            self.next_probe = max(self.next_probe, min(self.MAX_PAUSE, wait))
        self.idle += 1
        if self.idle % self.next_probe == 0:
            self.next_probe = min(self.MAX_PAUSE, 2 * self.next_probe)
            return 1
        return 0

    def _median(self, window: list[float], new: float) -> float:
        """Median of the last WINDOW samples: on a shared machine a step the OS preempted takes several
        times as long, and one such sample must not switch speculation off (a mean would let it)."""
        window.append(new)
        del window[: -self.WINDOW]
        return statistics.median(window)

    def plain(self, seconds: float) -> None:
        self.plain_steps += 1
        if self.plain_steps > 1:  # the very first step may build the fused decode stack
            self.plain_s = self._median(self._plain, seconds)

    def observe(self, kept: int, judged: int, key=None) -> None:
        c = self._counts(key)
        c[0] = self.DECAY * c[0] + kept
        c[1] = self.DECAY * c[1] + judged

    def round(self, k: int, accepted: int, seconds: float, key=None) -> None:
        # each kept draft is a success; the first rejected one (if any) a failure: the MLE of a
        self.observe(accepted, accepted + (accepted < k), key)
        if self.plain_s is not None:
            self.row_s = self._median(self._row, max(0.0, seconds - self.plain_s) / k)
