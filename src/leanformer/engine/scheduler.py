"""Continuous batching over KV-cache slots: requests in, batches out.

Three parts with narrow interfaces (vLLM's split, kept small):
- `Request` / `Output`: all the server hands in and gets back (token ids, text deltas, finish reason).
- `Scheduler`: owns the cache slots. Each `step()` retires cancelled / timed-out requests, admits waiting
  ones into free slots, runs one chunk of prefill for newly admitted prompts (several short prompts share
  one padded forward; a long prompt is cut into chunks so it never stalls the others for long) and one
  batched decode step for every running request. A request leaves the batch the step it finishes, so a
  short request never waits for a long one.
- `Engine` (engine/runner.py): one thread that calls `step()` while there is work.
engine/finishing.py holds the Scheduler's other half: accepting a chosen token, emitting outputs and
ending a request exactly once (the `Finishing` mixin).

Memory: the KV cache is allocated once (n_slots × max_seq tokens), so its budget is fixed at start and
can never be exceeded: a request waits in a bounded queue for a free slot. engine/paged.py's
PagedScheduler fills the KV-memory hooks (_claim / _grow / _computed / _release) with blocks instead. Capacity is n_slots +
max_waiting requests in flight (waiting or holding a slot): counting only the queue refused requests
that arrived together while slots were free but not yet claimed by the engine thread.
Isolation: an exception while admitting, prefilling, decoding or sampling one request ends that
request alone with finish_reason "error" (and frees its slot); a batched forward that fails is retried
row by row so the rows that work go on. `errors` counts these failures by stage for /metrics.
Exactness: every row attends only to its own slot's keys at its own positions (KVCache's per-slot
lengths + mask), and each request samples with its own parameters and seeded generator, so a greedy or
seeded request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import torch

from leanformer.engine.finishing import Finishing, _message
from leanformer.engine.prefill import chained
from leanformer.engine.request import (
    Output,
    QueueFull,
    Request,
    SeqState,
    ShuttingDown,
    TokenLogprob,
    token_logprob,
)
from leanformer.engine.sampling import greedy_tokens, sample
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache

# re-exported: the server and tests import the request types from here
__all__ = ["Output", "QueueFull", "Request", "Scheduler", "ShuttingDown", "TokenLogprob"]

log = logging.getLogger("leanformer.engine")


class Scheduler(Finishing):
    """Continuous batching on one model and one KVCache. Not thread-safe except `submit`/`n_waiting`."""

    def __init__(
        self,
        model,
        tok,
        n_slots: int,
        max_seq: int,
        prefill_chunk: int = 256,
        max_waiting: int = 256,
        cache=None,
    ) -> None:
        if n_slots < 1:
            raise LeanformerError("the KV cache needs at least one slot")
        self.model, self.tok = model, tok
        # `cache`: another cache with KVCache's interface (engine/paged.py's PagedScheduler gives its own)
        self.cache = KVCache.for_model(model, n_slots, max_seq) if cache is None else cache
        n_slots = self.cache.n_slots
        self.max_seq = self.cache.max_seq
        self.vocab = model.args.vocab_size
        self.prefill_chunk = max(1, prefill_chunk)
        self.decode_rows: int | None = None  # None: every running row in one decode forward
        self.row_chunk: int | None = None  # most prompt tokens of one row per prefill (None: the budget)
        self.spec = None  # engine/spec_batch.py's SpecDecoder: per-request speculative decoding
        self.max_waiting = max_waiting
        self.free = list(range(n_slots))  # lowest slot first keeps the batch's slots compact
        self.waiting: deque[Request] = deque()
        self.prefilling: list[SeqState] = []
        self.running: list[SeqState] = []
        self.closed = False
        self._lock = threading.Lock()  # guards `waiting`, `closed`, `_in_flight` against submitting threads
        self._in_flight = 0  # submitted and not ended: waiting, prefilling or running
        # counters read by /metrics (plain ints: a torn read is harmless)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.batch_sizes: Counter[int] = Counter()  # decode batch size → number of steps
        self.finished: Counter[str] = Counter()  # finish reason → requests
        self.errors: Counter[str] = Counter()  # stage (admit, prefill, decode, sample, ...) → failed requests

    # ---- any thread ----
    def check(self, req: Request) -> None:
        """Raise LeanformerError when the request can never run: empty, or longer than a slot."""
        if not req.prompt:
            raise LeanformerError("empty prompt: give at least one token")
        if req.max_tokens < 1:
            raise LeanformerError(f"max_tokens must be ≥ 1, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > self.max_seq:
            raise LeanformerError(
                f"this server's context is {self.max_seq} tokens, but the request needs "
                f"{len(req.prompt) + req.max_tokens} ({len(req.prompt)} in the prompt + max_tokens "
                f"{req.max_tokens}); shorten the prompt or lower max_tokens"
            )

    def submit(self, req: Request) -> None:
        self.check(req)
        with self._lock:
            if self.closed:
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.capacity:
                raise QueueFull(
                    f"the server is full ({self.cache.n_slots} running + {self.max_waiting} waiting)"
                )
            req.submitted = time.monotonic()
            self._in_flight += 1
            self.waiting.append(req)

    @property
    def capacity(self) -> int:
        """Requests in flight (holding a slot or waiting for one) before `submit` refuses."""
        return self.cache.n_slots + self.max_waiting

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- engine thread ----
    @torch.inference_mode()
    def step(self) -> None:
        self._retire_cancelled()
        self._admit()
        if self.prefilling:
            self._prefill()
        if self.running:
            self._decode()

    def abort_all(self, reason: str = "abort") -> None:
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for req in waiting:
            self._emit_final(req, reason, 0)
        for s in self.prefilling + self.running:
            self._finish(s, reason)

    def _retire_cancelled(self) -> None:
        now = time.monotonic()

        def expired(req: Request) -> str | None:
            if req.cancelled:
                return "cancelled"
            if req.timeout is not None and now - req.submitted > req.timeout:
                return "timeout"
            return None

        with self._lock:
            gone = [(r, why) for r in self.waiting if (why := expired(r))]
            if gone:
                dropped = {id(r) for r, _ in gone}
                self.waiting = deque(r for r in self.waiting if id(r) not in dropped)
        for req, why in gone:
            self._emit_final(req, why, 0)
        for s in self.prefilling + self.running:
            if why := expired(s.req):
                self._finish(s, why)

    def _admit(self) -> None:
        while self.free:
            with self._lock:
                if not self.waiting:
                    return
                req = self.waiting[0]  # only this thread removes from `waiting`: still first below
            self.free.sort()
            slot = self.free[0]
            try:  # e.g. a seed torch refuses: that request fails, its slot stays free
                self.cache.reset(torch.tensor([slot]))
                seq = SeqState(req, slot, self.tok, self.vocab)
                if not self._claim(seq):
                    return  # its KV memory is not free yet: it waits, first in line
            except Exception as e:
                with self._lock:
                    self.waiting.popleft()
                self.errors["admit"] += 1
                log.exception("could not admit request %s", req.id)
                self._emit_final(req, "error", 0, _message(e))
                continue
            with self._lock:
                self.waiting.popleft()
            self.free.pop(0)
            self.prefilling.append(seq)

    # ---- KV memory hooks: a slot is all a request needs here; engine/paged.py gives out blocks ----
    def _claim(self, seq: SeqState) -> bool:
        """Take the KV memory `seq` needs (setting seq.prefilled to what is already cached), or False."""
        return True

    def _grow(self, seqs: list[SeqState], lengths: list[int]) -> None:
        """Make room for each sequence's first `lengths` tokens before a forward writes them."""

    def _computed(self, seqs: list[SeqState]) -> None:
        """A forward put these sequences' tokens in the cache (lengths already moved)."""

    def _release(self, seq: SeqState) -> None:
        """The sequence ended: give its KV memory back."""

    def _prefill(self) -> None:
        """One forward over the next prompt chunk of as many new requests as the budget allows (chained
        rows of the fused decode step where it takes them, engine/prefill.py; else padded).

        The budget counts padded tokens (rows × longest chunk), so a long prompt runs alone in chunks
        of `prefill_chunk` and short ones share a forward. Padding lands past a row's length in its own
        slot, where the next real token overwrites it and the mask hides it meanwhile.
        """
        budget = self.prefill_chunk
        batch: list[tuple[SeqState, int]] = []
        width = 0
        for s in self.prefilling:
            n = min(len(s.fill) - s.prefilled, budget, self.row_chunk or budget)
            w = max(width, n)
            starts = [int(self.cache.lengths[b.slot]) for b, _ in batch] + [int(self.cache.lengths[s.slot])]
            if batch and ((len(batch) + 1) * w > budget or max(starts) + w > self.cache.max_seq):
                break
            batch.append((s, n))
            width = w
        batch, logits = self._isolated(batch, self._prefill_forward, "prefill")
        done_rows: list[int] = []
        for row, (s, n) in enumerate(batch):
            s.prefilled += n
            self.prompt_tokens_total += n
            if s.prefilled == len(s.fill):
                done_rows.append(row)
        done = [batch[r][0] for r in done_rows]
        self.prefilling = [s for s in self.prefilling if s not in done]
        self.running.extend(done)
        fresh = [r for r in done_rows if not batch[r][0].resumed]
        for r in done_rows:  # a resumed request's next token was chosen before its preemption
            batch[r][0].resumed = False
        if fresh:
            self._sample_and_emit([batch[r][0] for r in fresh], logits[fresh])

    def _prefill_forward(self, batch: list[tuple[SeqState, int]]) -> torch.Tensor:
        width = max(n for _, n in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
        for row, (s, n) in enumerate(batch):
            ids[row, :n] = torch.tensor(s.fill[s.prefilled : s.prefilled + n])
        slots = torch.tensor([s.slot for s, _ in batch])
        counts = torch.tensor([n for _, n in batch])
        self._grow([s for s, _ in batch], (self.cache.lengths[slots] + counts).tolist())
        # chained rows of the fused decode step where it takes them (engine/prefill.py), else a padded forward
        pieces = [
            (s.slot, int(self.cache.lengths[s.slot]), s.fill[s.prefilled : s.prefilled + n]) for s, n in batch
        ]
        logits = chained(self.model, self.cache, pieces)
        if logits is None:
            logits = self.model(ids, cache=self.cache, slots=slots, logits_at=counts - 1)[:, -1]
        logits = logits.float()
        # advance, not set: a window cache (engine/windowed.py) may have slid the row in begin()
        self.cache.advance(slots, counts)
        self._computed([s for s, _ in batch])
        return logits

    def _decode(self) -> None:
        # rows per forward: the fused C++ decode step takes at most MAX_ROWS; more rows in one forward
        # would fall back to the module path (measured slower than two fused forwards, BENCHMARKS.md)
        running = list(self.running)
        if self.spec is not None:  # rows with drafts are verified (and emitted) there; the rest step plainly
            running = self.spec.decode(self, running)
        rows = self.decode_rows or max(1, len(running))
        for i in range(0, len(running), rows):
            seqs, logits = self._isolated(running[i : i + rows], self._decode_forward, "decode")
            if seqs:
                self.steps_total += 1
                self.batch_sizes[len(seqs)] += 1
                self._sample_and_emit(seqs, logits)

    def _decode_forward(self, seqs: list[SeqState]) -> torch.Tensor:
        tokens = torch.tensor([[s.next_token] for s in seqs])  # [B, 1]
        slots = torch.tensor([s.slot for s in seqs])
        self._grow(seqs, (self.cache.lengths[slots] + 1).tolist())
        logits = self.model(tokens, cache=self.cache, slots=slots)[:, -1].float()  # [B, V]
        self.cache.advance(slots, 1)
        self._computed(seqs)
        return logits

    def _isolated(self, items: list, forward: Callable[[list], torch.Tensor], stage: str):
        """forward(items) → logits [B, V]; when the batch fails, each item is retried alone and the
        ones that fail alone end with an error. → (surviving items, their logits).

        A retry is safe: the cache lengths move only after a forward succeeds, so a row's retry writes
        the same positions the failed batch may have half-written."""
        try:
            return items, forward(items)
        except Exception as e:
            if len(items) == 1:
                self._fail(_seq_of(items[0]), stage, e)
                return [], None
            log.warning("batched %s failed (%s); retrying %d rows one by one", stage, e, len(items))
        kept, rows = [], []
        for item in items:
            try:
                rows.append(forward([item]))
                kept.append(item)
            except Exception as e:
                self._fail(_seq_of(item), stage, e)
        return kept, (torch.cat(rows) if rows else None)

    def _sample_and_emit(self, seqs: list[SeqState], logits: torch.Tensor) -> None:
        """logits [B, V] float32, row i for seqs[i]: choose each row's token with its own parameters.
        A row that fails (sampling, logprobs, detokenizing) ends alone; the others go on."""
        tokens: list[int | None] = [None] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.req.params.greedy and s.seen is None]
        if greedy:
            try:  # one argmax for all the plain greedy rows; if that fails, they go row by row below
                for i, t in zip(greedy, greedy_tokens(logits[greedy]).tolist()):
                    tokens[i] = t
            except Exception:
                log.exception("batched greedy choice failed; choosing row by row")
        for i, s in enumerate(seqs):
            try:
                if tokens[i] is None:
                    seen = None if s.seen is None else s.seen[None]
                    tokens[i] = int(sample(logits[i : i + 1], s.req.params, s.generator, seen)[0])
                if not 0 <= tokens[i] < self.vocab:
                    raise LeanformerError(f"sampled token id {tokens[i]} is outside the vocabulary")
            except Exception as e:
                self._fail(s, "sample", e)
                continue
            try:
                lp = None if s.req.logprobs is None else token_logprob(logits[i], tokens[i], s.req.logprobs)
                self._accept(s, tokens[i], lp)
            except Exception as e:
                self._fail(s, "output", e)


def _seq_of(item) -> SeqState:
    return item[0] if isinstance(item, tuple) else item
