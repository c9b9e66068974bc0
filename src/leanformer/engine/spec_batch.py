"""Per-request speculative decoding inside continuous batching (the server's `"speculative"` field).

Each decode step, every running greedy request that asked for speculation (Request.speculative,
"prompt-lookup") may get drafts from prompt lookup (engine/speculative.py's `lookup`: what followed the
latest earlier occurrence of its last n tokens). All running requests then go through ONE forward of
one-token rows, as plain decoding does: a request without drafts is one row, a request with k drafts
is k + 1 rows [next token, draft 1..k] chained in its own sequence (row i at position length + i,
attending to its keys 0..length + i; every row writes its K/V before any row attends). The model
therefore runs its plain decode kernels (the fused C++ step, the M-row GEMV) on verification rows too,
which keeps greedy outputs identical to non-speculative serving (tests/engine/test_scheduler_spec.py).
Per request, the drafts that equal the target's argmax are kept, then its cache length moves by
1 + accepted only: each row of the batch rolls back its own rejected drafts (rows of different
acceptance share the forward); their K/V lie past the length, never read, overwritten next step.
Sampled requests take plain steps: their draft lengths would depend on the batch, and a seeded request's
tokens must not.

Never (much) slower: the forward's cost is learnt online as a + b × rows (a line through the median
time of each row count seen), so one more verified row costs c = b / (a / B + b) of a plain token in a batch
of B; per request, the share of drafts that survive (alpha, decayed counts; while taking plain steps it
is still learnt by checking what lookup would have guessed) gives its i-th draft a chance alpha^i to be
kept. A request drafts while alpha^i > 1.25 c (a margin: see _draft_len), so on a CPU where every row costs nearly as much as a token
(int4 GEMV on AVX2) it drafts only when its drafts nearly always survive, and on one where extra rows
are almost free (memory-bound fp32) it drafts freely.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from leanformer.engine.request import SeqState, token_logprob
from leanformer.engine.speculative import PromptLookup, lookup, verify
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.kv_cache import Step
from leanformer.models.paged_cache import PagedKVCache, PagedStep

log = logging.getLogger("leanformer.engine")

METHODS = ("prompt-lookup",)  # what a server request may ask for ("off": none)


def check_method(method: str | None) -> str | None:
    """A request's or the server's speculative method → itself, or None for "off"/None."""
    if method is None or method == "off":
        return None
    if method not in METHODS:
        raise LeanformerError(f"unknown speculative method {method!r}: the server takes prompt-lookup or off")
    return method


@dataclass
class _Row:
    """One request's acceptance record (decayed counts; prior: half the drafts survive)."""

    hits: float = 1.0
    trials: float = 2.0
    guess: int | None = None  # what lookup guessed for the token a plain step is choosing
    spec: bool = True  # drafting (False: fallen back to plain steps)

    @property
    def alpha(self) -> float:
        return min(self.hits / self.trials, 0.999)

    def observe(self, kept: int, judged: int, decay: float = 0.9) -> None:
        self.hits = decay * self.hits + kept
        self.trials = decay * self.trials + judged


class _Cost:
    """Seconds per decode forward as a + b × rows: a line through the median time of each row count
    (the last WINDOW forwards of each), so a shared machine's spikes do not bend it."""

    WINDOW, FLOOR = 15, 0.1  # FLOOR: the least a verified row is taken to cost, in plain tokens

    def __init__(self) -> None:
        self.times: dict[int, deque[float]] = {}
        self.last = (0.0, 0.0)  # (a, b) of the last fit that saw two row counts
        self.fitted = False

    def add(self, rows: int, seconds: float) -> None:
        self.times.setdefault(rows, deque(maxlen=self.WINDOW)).append(seconds)

    def draft_cost(self, batch: int) -> float:
        """c: one more verified row's cost, in plain tokens of a batch of `batch` rows; until two row
        counts have been timed 3 times, 0.3 (drafts surviving 1 time in 2 are tried: that times others)."""
        pts = [(r, statistics.median(t)) for r, t in self.times.items() if len(t) >= 3]
        if len(pts) >= 2:
            mx, my = statistics.fmean(r for r, _ in pts), statistics.fmean(y for _, y in pts)
            var = statistics.fmean((r - mx) ** 2 for r, _ in pts)
            b = max(statistics.fmean((r - mx) * (y - my) for r, y in pts) / var, 0.0)
            self.last, self.fitted = (max(my - b * mx, 0.0), b), True
        if not self.fitted:
            return 0.3
        a, b = self.last
        c = b / (a / max(batch, 1) + b) if b > 0 else 0.0
        return max(c, self.FLOOR)


class _Chain:
    """A cache seen by a forward of one-token rows where row r is the token at position positions[r] of
    slot slots[r] (several rows may chain in one slot). Everything but begin() is the cache's."""

    def __init__(self, cache, slots: list[int], positions: list[int]) -> None:
        self._cache = cache
        self._slots, self._pos = torch.tensor(slots), torch.tensor(positions)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        if n_new != 1:
            raise LeanformerError("a chained cache step takes one token per row (input_ids [R, 1])")
        c, rows = self._cache, len(self._slots)
        key_len = int(self._pos.max()) + 1
        if key_len > c.max_seq:
            raise LeanformerError(f"sequence of {key_len} tokens exceeds the cache/context size {c.max_seq}")
        positions = self._pos[:, None]  # [R, 1]
        mask = torch.arange(key_len)[None, None, None, :] <= positions[:, None, :, None]  # [R, 1, 1, S]
        if not isinstance(c, PagedKVCache):
            dev = c.k[0].device
            return Step(self._slots.to(dev), positions.to(dev), key_len, mask.to(dev), False, None)
        # paged: rows read their sequence's blocks; a fused step works on one gathered view row per
        # sequence (step.slots names it), so the rows of a chain see each other's new K/V there
        seqs, group = torch.unique(self._slots, return_inverse=True)  # [G], [R]
        tables = c.block_tables[seqs]  # [G, max_blocks]
        keys = torch.arange(key_len)
        write = c._rows(tables[group], positions)  # [R, n_kv, 1]
        read = c._rows(tables[group], keys.expand(rows, key_len))  # [R, n_kv, S]
        view = c._rows(tables, keys.expand(len(seqs), key_len))  # [G, n_kv, S]
        dev = c.device
        step = PagedStep(
            group.to(dev), positions.to(dev), key_len, mask.to(dev), False, None,
            write_rows=write.reshape(-1).to(dev), read_rows=read.reshape(-1).to(dev),
            view_rows=view.reshape(-1).to(dev),
        )  # fmt: skip
        c._views = None
        fits = c._view_bytes(len(seqs), key_len) <= c.FUSED_VIEW_BYTES
        c._step = step if c.fused_ok and fits else None
        return step


class SpecDecoder:
    """Speculation for the scheduler's decode step; the counters are read by /metrics."""

    MARGIN = 1.25  # a draft must be expected to pay 1.25× its cost

    def __init__(self, config: PromptLookup | None = None) -> None:
        self.config = config or PromptLookup(max_draft=min(8, MAX_ROWS - 1))
        self.cost = _Cost()
        self.drafted_total = 0  # draft tokens verified
        self.accepted_total = 0  # of them, kept
        self.rounds_total = 0  # (request, step) verifications
        self.fallbacks_total = 0  # times a request stopped drafting (acceptance too low)

    def _draft_len(self, row: _Row, c: float) -> int:
        """Drafts worth verifying: the i-th survives with alpha^i and costs c; MARGIN because a request
        drafts right after its estimate rose (selection bias: measured acceptance falls short of it)."""
        k, a = 0, row.alpha
        while k < self.config.max_draft and a ** (k + 1) > self.MARGIN * c:
            k += 1
        if k == 0 and row.spec:
            self.fallbacks_total += 1
        row.spec = k > 0
        return k

    def _drafts(self, s: SeqState, limit: int, c: float) -> list[int]:
        """Row s's drafts (≤ limit tokens), or [] for a plain step."""
        if s.req.speculative is None or not s.req.params.greedy or s.seen is not None:
            # sampling: plain steps keep a seeded request's tokens independent of the batch (the
            # draft lengths depend on it); a repetition penalty rescores every drafted position
            return []
        row: _Row = s.spec if isinstance(getattr(s, "spec", None), _Row) else _Row()
        s.spec = row
        seq = s.req.prompt + s.out
        if row.guess is not None and s.out:  # the last plain step's free check of what lookup guessed
            row.observe(int(row.guess == s.out[-1]), 1)
            row.guess = None
        cfg = self.config
        k = min(self._draft_len(row, c), limit)
        drafts = lookup(seq, k, cfg.ngram, cfg.min_ngram) if k > 0 else []
        if not drafts:
            guess = lookup(seq, 1, cfg.ngram, cfg.min_ngram)
            row.guess = guess[0] if guess else None
        return drafts

    def decode(self, sched, running: list[SeqState]) -> list[SeqState]:
        """Decode every running row (verifying drafts where there are some); → rows left for the
        scheduler's plain step (all of them when no request asked for speculation)."""
        if not any(s.req.speculative for s in running):
            return running
        cap = min(sched.decode_rows or MAX_ROWS, MAX_ROWS)  # rows the fused decode step takes at once
        c = self.cost.draft_cost(len(running))
        # paged cache: drafts only take blocks no running request needs for its next token
        spare = sched.spare_blocks() if hasattr(sched, "spare_blocks") else None
        plan = []
        for s in running:
            length = int(sched.cache.lengths[s.slot])
            # never past max_tokens, the cache, or one forward's rows
            limit = min(s.req.max_tokens - len(s.out) - 1, sched.cache.max_seq - length - 1, cap - 1)
            if spare is not None:
                blocks = len(s.table.blocks) + s.table.reserved + sched._need(s, 1) + spare
                limit = min(limit, blocks * sched.blocks.block_size - length - 1)
            drafts = self._drafts(s, limit, c)
            if spare is not None and drafts:
                spare -= sched._need(s, 1 + len(drafts)) - sched._need(s, 1)
            plan.append((s, drafts))
        group, rows = [], 0
        for s, drafts in plan + [(None, [])]:
            if s is None or rows + 1 + len(drafts) > cap:
                self._run(sched, group)
                group, rows = [], 0
            if s is not None:
                group.append((s, drafts))
                rows += 1 + len(drafts)
        return []

    def _run(self, sched, group: list[tuple[SeqState, list[int]]]) -> None:
        """One forward for `group`: a plain decode step when nothing is drafted, else the chains."""
        if not group:
            return
        rows = sum(1 + len(d) for _, d in group)
        t0 = time.perf_counter()
        if rows == len(group):
            seqs, logits = sched._isolated([s for s, _ in group], sched._decode_forward, "decode")
            self.cost.add(rows, time.perf_counter() - t0)
            if seqs:
                sched.steps_total += 1
                sched.batch_sizes[len(seqs)] += 1
                sched._sample_and_emit(seqs, logits)
            return
        items, logits = sched._isolated(group, lambda b: self._forward(sched, b), "decode")
        self.cost.add(rows, time.perf_counter() - t0)
        if items:
            sched.steps_total += 1
            sched.batch_sizes[len(items)] += 1
            self._accept(sched, items, logits)

    @staticmethod
    def _forward(sched, batch: list[tuple[SeqState, list[int]]]) -> torch.Tensor:
        """→ logits [R, V] of the chained rows [next token, drafts...] of every request in `batch`."""
        seqs = [s for s, _ in batch]
        lengths = [int(sched.cache.lengths[s.slot]) for s in seqs]
        sched._grow(seqs, [n + 1 + len(d) for n, (_, d) in zip(lengths, batch)])
        ids, slots, positions = [], [], []
        for n, (s, d) in zip(lengths, batch):
            ids += [s.next_token, *d]
            slots += [s.slot] * (1 + len(d))
            positions += range(n, n + 1 + len(d))
        chain = _Chain(sched.cache, slots, positions)
        rows = torch.tensor(ids)[:, None]  # [R, 1]
        return sched.model(rows, cache=chain, slots=torch.arange(len(ids)))[:, -1].float()

    def _accept(self, sched, items: list[tuple[SeqState, list[int]]], logits: torch.Tensor) -> None:
        """logits [R, V]: request i's rows start at the sum of the earlier requests' 1 + drafts."""
        moved, first = [], 0
        for s, drafts in items:
            k, lo = len(drafts), first
            first += 1 + k
            try:
                n, nxt = verify(logits[lo : lo + k + 1], drafts, None, s.req.params, s.generator)
                if not 0 <= nxt < sched.vocab:
                    raise LeanformerError(f"sampled token id {nxt} is outside the vocabulary")
            except Exception as e:
                sched._fail(s, "sample", e)
                continue
            if k:
                self.drafted_total += k
                self.accepted_total += n
                self.rounds_total += 1
                s.spec.observe(n, n + (n < k))
            moved.append((s, 1 + n))  # the fed token + the kept drafts are in the cache now
            for i, t in enumerate([*drafts[:n], nxt]):
                try:
                    lp = None if s.req.logprobs is None else token_logprob(logits[lo + i], t, s.req.logprobs)
                    sched._accept(s, t, lp)
                except Exception as e:
                    sched._fail(s, "output", e)
                if s.req.ended:
                    break
        live = [(s, m) for s, m in moved if not s.req.ended]
        if live:
            slots = torch.tensor([s.slot for s, _ in live])
            sched.cache.advance(slots, torch.tensor([m for _, m in live]))
            sched._computed([s for s, _ in live])
        elif moved:  # every row ended: the fused view (if any) has nothing left to copy back
            sched.cache.advance(torch.tensor([], dtype=torch.long), 0)
