"""Per-request speculative decoding inside continuous batching (the server's `"speculative"` field).

Each decode step, every running request that asked for speculation (Request.speculative, e.g.
"prompt-lookup") and has a prompt-lookup draft (engine/speculative.py's `lookup`: the continuation of
the latest earlier occurrence of its last n tokens) is verified in ONE padded forward of the target:
row b feeds [its next token, draft 1..k_b] at its own positions, padded to the longest row. The rows
without drafts take the scheduler's plain decode step as before. Per row, the drafts that equal the
target's argmax are kept (greedy requests only: a sampled request takes plain steps, so a seeded
request's tokens stay independent of what shares its batch) and the cache is rolled back per row: its length moves by
1 + accepted only, so the K/V of rejected drafts and of the padding lie past the length, hidden by the
mask and overwritten by the next step (rows of different acceptance in one batch each keep their own).

Greedy output equals non-speculative serving up to float rounding (a T-token verification sums in a
different order than a one-token decode step, ~1e-6 on the logits): tests/engine/test_scheduler_spec.py.

Never much slower: per request, the share of drafts that survive is tracked (decayed counts; while it
takes plain steps a greedy request still learns it for free by checking what lookup would have
guessed); the draft length maximises expected tokens per unit of cost, cost = 1 + ROW_COST × k, and is
0 (a plain step) when no draft length pays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from leanformer.engine.request import SeqState, token_logprob
from leanformer.engine.speculative import PromptLookup, lookup, verify
from leanformer.errors import LeanformerError

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


class SpecDecoder:
    """Speculation for the scheduler's decode step; the counters are read by /metrics."""

    ROW_COST = 0.1  # extra cost of one verified draft token, in plain decode steps (a guess, see above)

    def __init__(self, config: PromptLookup | None = None) -> None:
        self.config = config or PromptLookup()
        self.drafted_total = 0  # draft tokens verified
        self.accepted_total = 0  # of them, kept
        self.rounds_total = 0  # (request, step) verifications
        self.fallbacks_total = 0  # times a request stopped drafting (acceptance too low)

    def _draft_len(self, row: _Row) -> int:
        a, best, best_rate = row.alpha, 0, 1.0
        for k in range(1, self.config.max_draft + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (1 + self.ROW_COST * k)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0 and row.spec:
            self.fallbacks_total += 1
        row.spec = best > 0
        return best

    def _drafts(self, s: SeqState, limit: int) -> list[int]:
        """Row s's drafts (≤ limit tokens), or [] for a plain step."""
        if s.req.speculative is None or not s.req.params.greedy or s.seen is not None or limit < 1:
            # sampling: plain steps keep a seeded request's tokens independent of the batch (the
            # draft lengths depend on it); a repetition penalty rescores every drafted position
            return []
        row: _Row = s.spec if isinstance(getattr(s, "spec", None), _Row) else _Row()
        s.spec = row
        seq = s.req.prompt + s.out
        if row.guess is not None and s.out:  # the last plain step's free check of what lookup guessed
            row.observe(int(row.guess == s.out[-1]), 1)
            row.guess = None
        c = self.config
        k = min(self._draft_len(row), limit)
        drafts = lookup(seq, k, c.ngram, c.min_ngram) if k > 0 else []
        if not drafts:
            guess = lookup(seq, 1, c.ngram, c.min_ngram)
            row.guess = guess[0] if guess else None
        return drafts

    def decode(self, sched, running: list[SeqState]) -> list[SeqState]:
        """Verify (and emit) the rows that have drafts; → the rows left for a plain decode step."""
        plan, plain = [], []
        # paged cache: drafts only take blocks no running request needs for its next token
        spare = sched.spare_blocks() if hasattr(sched, "spare_blocks") else None
        for s in running:
            length = int(sched.cache.lengths[s.slot])
            # never draft past max_tokens or the cache
            limit = min(s.req.max_tokens - len(s.out) - 1, sched.cache.max_seq - length - 1)
            if spare is not None:
                blocks = len(s.table.blocks) + s.table.reserved + sched._need(s, 1) + spare
                limit = min(limit, blocks * sched.blocks.block_size - length - 1)
            drafts = self._drafts(s, limit)
            if drafts:
                plan.append((s, drafts))
                if spare is not None:
                    spare -= sched._need(s, 1 + len(drafts)) - sched._need(s, 1)
            else:
                plain.append(s)
        if not plan:
            return plain
        # one padded width for the batch and for any row-by-row retry; padding stays inside the cache
        top = max(int(sched.cache.lengths[s.slot]) for s, _ in plan)
        width = min(max(len(d) for _, d in plan) + 1, sched.cache.max_seq - top)
        plan = [(s, d[: width - 1]) for s, d in plan]
        kept = [(s, d) for s, d in plan if d]
        plain += [s for s, d in plan if not d]
        if kept:
            items, logits = sched._isolated(kept, lambda b: self._forward(sched, b, width), "decode")
            if items:
                sched.steps_total += 1
                sched.batch_sizes[len(items)] += 1
                self._accept(sched, items, logits)
        return plain

    @staticmethod
    def _forward(sched, batch: list[tuple[SeqState, list[int]]], width: int) -> torch.Tensor:
        """→ logits [B, width, V] of [next token, drafts...] per row (padding past each row's drafts)."""
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
        for row, (s, d) in enumerate(batch):
            ids[row, : 1 + len(d)] = torch.tensor([s.next_token, *d])
        seqs = [s for s, _ in batch]
        slots = torch.tensor([s.slot for s in seqs])
        sched._grow(
            seqs, (sched.cache.lengths[slots] + torch.tensor([1 + len(d) for _, d in batch])).tolist()
        )
        return sched.model(ids, cache=sched.cache, slots=slots).float()

    def _accept(self, sched, items: list[tuple[SeqState, list[int]]], logits: torch.Tensor) -> None:
        moved = []
        for row, (s, drafts) in enumerate(items):
            try:
                k = len(drafts)
                n, nxt = verify(logits[row, : k + 1], drafts, None, s.req.params, s.generator)
                if not 0 <= nxt < sched.vocab:
                    raise LeanformerError(f"sampled token id {nxt} is outside the vocabulary")
            except Exception as e:
                sched._fail(s, "sample", e)
                continue
            self.drafted_total += k
            self.accepted_total += n
            self.rounds_total += 1
            s.spec.observe(n, n + (n < k))
            moved.append((s, 1 + n))  # the fed token + the kept drafts are in the cache now
            for i, t in enumerate([*drafts[:n], nxt]):
                try:
                    lp = None if s.req.logprobs is None else token_logprob(logits[row, i], t, s.req.logprobs)
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
