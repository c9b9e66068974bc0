"""Per-request speculative decoding inside continuous batching (the server's `"speculative"` field).

Each decode step, every running greedy request that asked for speculation (Request.speculative,
"prompt-lookup") may get drafts from prompt lookup: the continuation of the longest recent match of its
text's last tokens (ngram.SuffixIndex, kept per request). All running requests then go through ONE
forward of one-token rows, as plain decoding does: a request without drafts is one row, a request with
k drafts is k + 1 rows [next token, draft 1..k] chained in its own sequence (spec_chain.Chain: row i at
position length + i, attending to its keys 0..length + i; every row writes its K/V before any row
attends). The model therefore runs its plain decode kernels (the fused C++ step, the M-row GEMV) on
verification rows too, which keeps greedy outputs identical to non-speculative serving
(tests/engine/test_scheduler_spec.py). Per request, the drafts that equal the target's argmax are kept,
then its cache length moves by 1 + accepted only: each row of the batch rolls back its own rejected
drafts (rows of different acceptance share the forward); their K/V lie past the length, never read,
overwritten next step. Sampled requests take plain steps: their draft lengths would depend on the
batch, and a seeded request's tokens must not.

Never (much) slower: the drafts of the whole batch are chosen together so that the batch's expected
output tokens per second go up (spec_batch_policy.allocate): the forward's cost per row count is timed
once per model (spec_chain.batch_costs: no online fit that prefill steps, first calls or a busy
machine could bend), each draft's survival chance is learnt per request and per suffix-match length
(spec_policy.LookupPolicy), and a request whose drafts do not pay takes a plain row (learning on for
free from what lookup would have guessed, so it comes back when its text starts to repeat).
"""

from __future__ import annotations

import logging

import torch

from leanformer.engine.request import SeqState, token_logprob
from leanformer.engine.spec_batch_policy import RequestDrafts, allocate
from leanformer.engine.spec_chain import Chain, batch_costs
from leanformer.engine.speculative import PromptLookup, verify
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS

log = logging.getLogger("leanformer.engine")

METHODS = ("prompt-lookup",)  # what a server request may ask for ("off": none)
_Chain = Chain  # the name tests and older callers know


def check_method(method: str | None) -> str | None:
    """A request's or the server's speculative method → itself, or None for "off"/None."""
    if method is None or method == "off":
        return None
    if method not in METHODS:
        raise LeanformerError(f"unknown speculative method {method!r}: the server takes prompt-lookup or off")
    return method


class SpecDecoder:
    """Speculation for the scheduler's decode step; the counters are read by /metrics."""

    # drafting must beat a plain step's expected tokens/s by 3% per request in the forward: estimates
    # are noisy, and with more requests the forward's real cost overruns the calibration more (SmolLM2
    # int4, 4 streams, CPU-time clock: a margin of 3% chose drafts that measured 0.97x, rounds 0.93-1.02;
    # one stream at 3%: 1.21x). More requests also leave less to win: their rows already share the step.
    MARGIN = 0.03

    def __init__(self, config: PromptLookup | None = None) -> None:
        self.config = config or PromptLookup(max_draft=min(8, MAX_ROWS - 1))
        self.costs: tuple[list[float], list[float]] | None = None  # batch_costs: (plain, chained)
        self.drafted_total = 0  # draft tokens verified
        self.accepted_total = 0  # of them, kept
        self.rounds_total = 0  # (request, step) verifications
        self.fallbacks_total = 0  # times a request stopped drafting (its drafts stopped paying)

    @staticmethod
    def _cap(sched) -> int:
        return min(sched.decode_rows or MAX_ROWS, MAX_ROWS)  # rows the fused decode step takes at once

    def calibrate(self, sched) -> None:
        """Time the forward's cost per row count (once per model and setting; the server calls this at
        start, so no request waits for it)."""
        if self.costs is None:
            cap = self._cap(sched)
            slots = min(sched.cache.n_slots, cap)
            try:
                self.costs = batch_costs(sched.model, slots, cap)
            except Exception:  # never draft (a row as dear as a step) rather than fail every request
                log.exception("could not time the decode forward: speculation stays off")
                self.costs = ([1.0] * slots, [float(m) for m in range(1, cap + 1)])
            plain, chained = self.costs
            log.info(
                "speculation: a decode forward costs %s (1..%d requests) and %s (1..%d chained rows) one-row steps",
                " ".join(f"{c:.2f}" for c in plain), len(plain), " ".join(f"{c:.2f}" for c in chained), len(chained),
            )  # fmt: skip

    def _state(self, s: SeqState) -> RequestDrafts | None:
        if s.req.speculative is None or not s.req.params.greedy or s.seen is not None:
            # sampling: plain steps keep a seeded request's tokens independent of the batch (the
            # draft lengths depend on it); a repetition penalty rescores every drafted position
            return None
        if not isinstance(getattr(s, "spec", None), RequestDrafts):
            cfg = self.config
            s.spec = RequestDrafts(cfg.max_draft, cfg.ngram, cfg.min_ngram)
        return s.spec

    def _limit(self, sched, s: SeqState, cap: int) -> int:
        """Drafts s may take: never past max_tokens, the cache, or one forward's rows."""
        length = int(sched.cache.lengths[s.slot])
        return min(s.req.max_tokens - len(s.out) - 1, sched.cache.max_seq - length - 1, cap - 1)

    def _plan(self, sched, group: list[SeqState], cap: int) -> list[tuple[SeqState, list[int]]]:
        """→ [(s, drafts)] for one forward of `group`."""
        states = [self._state(s) for s in group]
        offers = [
            st.offer(s.req.prompt, s.out, lambda s=s: self._limit(sched, s, cap)) if st is not None else []
            for s, st in zip(group, states)
        ]
        plain, chained = self.costs
        if any(offers):
            counts = allocate(offers, plain, chained, cap - len(group), self.MARGIN * len(group))
        else:  # nothing to draft this step (most steps of text that does not repeat)
            counts = [0] * len(group)
        plan = []
        for s, st, k in zip(group, states, counts):
            drafts: list[int] = []
            if st is not None:
                drafts, stopped = st.chosen(k, s.out)
                self.fallbacks_total += stopped
            plan.append((s, drafts))
        return plan

    @staticmethod
    def _fit(sched, plans: list[list[tuple[SeqState, list[int]]]]) -> None:
        """Paged: drafts take only blocks no request needs for its next token (cut in place)."""
        spare = sched.spare_blocks()
        for plan in plans:
            for i, (s, drafts) in enumerate(plan):
                if drafts:
                    length = int(sched.cache.lengths[s.slot])
                    blocks = len(s.table.blocks) + s.table.reserved + sched._need(s, 1) + spare
                    drafts = drafts[: max(0, blocks * sched.blocks.block_size - length - 1)]
                    spare -= sched._need(s, 1 + len(drafts)) - sched._need(s, 1)
                    plan[i] = (s, drafts)

    def decode(self, sched, running: list[SeqState]) -> list[SeqState]:
        """Decode every running row (verifying drafts where there are some); → rows left for the
        scheduler's plain step (all of them when no request drafts this step)."""
        if not any(s.req.speculative for s in running):
            return running
        self.calibrate(sched)
        cap = self._cap(sched)
        plans = [self._plan(sched, running[i : i + cap], cap) for i in range(0, len(running), cap)]
        if not any(d for plan in plans for _, d in plan):
            return running
        if hasattr(sched, "spare_blocks"):  # counted only when something is drafted (~20 µs a step)
            self._fit(sched, plans)
        if not any(d for plan in plans for _, d in plan):
            return running
        for plan in plans:
            self._run(sched, plan)
        return []

    def _run(self, sched, group: list[tuple[SeqState, list[int]]]) -> None:
        """One forward for `group`: a plain decode step when nothing is drafted, else the chains."""
        if not any(d for _, d in group):
            seqs, logits = sched._isolated([s for s, _ in group], sched._decode_forward, "decode")
            if seqs:
                sched.steps_total += 1
                sched.batch_sizes[len(seqs)] += 1
                sched._sample_and_emit(seqs, logits)
            return
        items, logits = sched._isolated(group, lambda b: self._forward(sched, b), "decode")
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
        chain = Chain(sched.cache, slots, positions)
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
                s.spec.verified(k, n)
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
