"""Continuous batching over KV-cache slots: requests in, batches out.

Three parts with narrow interfaces (vLLM's split, kept small):
- `Request` / `Output`: all the server hands in and gets back (token ids, text deltas, finish reason).
- `Scheduler`: owns the cache slots. Each `step()` retires cancelled / timed-out requests, admits waiting
  ones into free slots, runs one chunk of prefill for newly admitted prompts (several short prompts share
  one padded forward; a long prompt is cut into chunks so it never stalls the others for long) and one
  batched decode step for every running request. A request leaves the batch the step it finishes, so a
  short request never waits for a long one.
- `Engine` (engine/runner.py): one thread that calls `step()` while there is work.

Memory: the KV cache is allocated once (n_slots × max_seq tokens), so its budget is fixed at start and
can never be exceeded: a request waits in a bounded queue for a free slot, and a full queue refuses.
Exactness: every row attends only to its own slot's keys at its own positions (KVCache's per-slot
lengths + mask), and each request samples with its own parameters and seeded generator, so a greedy or
seeded request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import LeanformerError
from .cache import KVCache
from .detokenize import Detokenizer
from .sampling import SamplingParams, sample

log = logging.getLogger("leanformer.engine")


class QueueFull(LeanformerError):
    """The waiting queue is at its bound: come back later (HTTP 429 + Retry-After)."""


class ShuttingDown(LeanformerError):
    """The engine no longer admits requests (HTTP 503)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class Output:
    """What one step produced for one request; the last one has a finish_reason."""

    request_id: str
    index: int  # the request's `index` (choice number in an n>1 / multi-prompt API call)
    token_ids: list[int]  # new tokens (an EOS that ended the request is not included)
    text: str  # new text ("" while a piece is held back: half a UTF-8 character or a possible stop string)
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None | "stop" | "length" | "cancelled" | "timeout" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int  # generated so far, the EOS included
    error: str | None = None


def _ignore(out: Output) -> None:
    pass


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not in the output
    stop_ids: frozenset[int] = frozenset()  # e.g. EOS
    logprobs: int | None = None  # None: off; k ≥ 0: the chosen token's logprob + k alternatives
    timeout: float | None = None  # seconds from submission to the last token; None: no limit
    emit: Callable[[Output], None] = _ignore  # called on the engine thread: must not block
    index: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False  # set from any thread (Engine.cancel); acted on at the next step
    submitted: float = 0.0


class _Seq:
    """Engine-side state of an admitted request."""

    def __init__(self, req: Request, slot: int, tok, vocab: int) -> None:
        self.req, self.slot = req, slot
        self.prefilled = 0  # prompt tokens already in the cache
        self.out: list[int] = []
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.generator = None
        if not req.params.greedy:
            self.generator = torch.Generator()
            if req.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(req.params.seed)
        self.seen = None  # [V] bool, tokens in the sequence (for the repetition penalty)
        if req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[torch.tensor(req.prompt).clamp(0, vocab - 1)] = True
        self.detok = Detokenizer(tok, req.prompt, req.stop) if tok is not None else None


class Scheduler:
    """Continuous batching on one model and one KVCache. Not thread-safe except `submit`/`n_waiting`."""

    def __init__(
        self,
        model,
        tok,
        n_slots: int,
        max_seq: int,
        prefill_chunk: int = 256,
        max_waiting: int = 256,
    ) -> None:
        if n_slots < 1:
            raise LeanformerError("the KV cache needs at least one slot")
        self.model, self.tok = model, tok
        self.cache = KVCache.for_model(model, n_slots, max_seq)
        self.max_seq = self.cache.max_seq
        self.vocab = model.args.vocab_size
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_waiting = max_waiting
        self.free = list(range(n_slots))  # lowest slot first keeps the batch's slots compact
        self.waiting: deque[Request] = deque()
        self.prefilling: list[_Seq] = []
        self.running: list[_Seq] = []
        self.closed = False
        self._lock = threading.Lock()  # guards `waiting` and `closed` against submitting threads
        # counters read by /metrics (plain ints: a torn read is harmless)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.batch_sizes: Counter[int] = Counter()  # decode batch size → number of steps
        self.finished: Counter[str] = Counter()  # finish reason → requests

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
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the request queue is full ({self.max_waiting} waiting)")
            req.submitted = time.monotonic()
            self.waiting.append(req)

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
                req = self.waiting.popleft()
            self.free.sort()
            slot = self.free.pop(0)
            self.cache.reset(torch.tensor([slot]))
            self.prefilling.append(_Seq(req, slot, self.tok, self.vocab))

    def _prefill(self) -> None:
        """One padded forward over the next prompt chunk of as many new requests as the budget allows.

        The budget counts padded tokens (rows × longest chunk), so a long prompt runs alone in chunks
        of `prefill_chunk` and short ones share a forward. Padding lands past a row's length in its own
        slot, where the next real token overwrites it and the mask hides it meanwhile.
        """
        budget = self.prefill_chunk
        batch: list[tuple[_Seq, int]] = []
        width = 0
        for s in self.prefilling:
            n = min(len(s.req.prompt) - s.prefilled, budget)
            w = max(width, n)
            starts = [b.prefilled for b, _ in batch] + [s.prefilled]
            if batch and ((len(batch) + 1) * w > budget or max(starts) + w > self.max_seq):
                break
            batch.append((s, n))
            width = w
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
        for row, (s, n) in enumerate(batch):
            ids[row, :n] = torch.tensor(s.req.prompt[s.prefilled : s.prefilled + n])
        slots = torch.tensor([s.slot for s, _ in batch])
        counts = torch.tensor([n for _, n in batch])
        logits = self.model(ids, cache=self.cache, slots=slots, logits_at=counts - 1)[:, -1].float()
        self.cache.set_length(slots, torch.tensor([s.prefilled for s, _ in batch]) + counts)
        done_rows: list[int] = []
        for row, (s, n) in enumerate(batch):
            s.prefilled += n
            self.prompt_tokens_total += n
            if s.prefilled == len(s.req.prompt):
                done_rows.append(row)
        done = [batch[r][0] for r in done_rows]
        self.prefilling = [s for s in self.prefilling if s not in done]
        self.running.extend(done)
        if done:
            self._sample_and_emit(done, logits[done_rows])

    def _decode(self) -> None:
        seqs = list(self.running)
        tokens = torch.tensor([[s.next_token] for s in seqs])  # [B, 1]
        slots = torch.tensor([s.slot for s in seqs])
        logits = self.model(tokens, cache=self.cache, slots=slots)[:, -1].float()  # [B, V]
        self.cache.advance(slots, 1)
        self.steps_total += 1
        self.batch_sizes[len(seqs)] += 1
        self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """logits [B, V] float32, row i for seqs[i]: choose each row's token with its own parameters."""
        tokens = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.req.params.greedy and s.seen is None]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                tokens[i] = t
        for i, s in enumerate(seqs):
            if s.req.params.greedy and s.seen is None:
                continue
            seen = None if s.seen is None else s.seen[None]
            tokens[i] = int(sample(logits[i : i + 1], s.req.params, s.generator, seen)[0])
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            lp = None
            if s.req.logprobs is not None:
                lp = _logprob(logits[i], t, s.req.logprobs)
            self._accept(s, t, lp)

    def _accept(self, s: _Seq, token: int, lp: TokenLogprob | None) -> None:
        req = s.req
        s.out.append(token)
        s.next_token = token
        self.generation_tokens_total += 1
        if s.seen is not None:
            s.seen[min(token, self.vocab - 1)] = True
        if token in req.stop_ids:
            return self._finish(s, "stop")
        text, stopped = s.detok.add(token) if s.detok is not None else ("", False)
        reason = "stop" if stopped else ("length" if len(s.out) >= req.max_tokens else None)
        if reason is None:
            self._safe_emit(
                req,
                Output(req.id, req.index, [token], text, _one(lp), None, len(req.prompt), len(s.out)),
            )
        else:
            self._finish(s, reason, [token], text, _one(lp))

    def _finish(
        self,
        s: _Seq,
        reason: str,
        tokens: list[int] = (),
        text: str = "",
        lps: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        """Free the slot now and send the request's last output."""
        if s in self.running:
            self.running.remove(s)
        if s in self.prefilling:
            self.prefilling.remove(s)
        self.free.append(s.slot)
        if reason in ("length", "stop") and s.detok is not None:
            text += s.detok.flush()  # what was held back (after a stop string: nothing)
        self.finished[reason] += 1
        out = Output(s.req.id, s.req.index, list(tokens), text, lps, reason, len(s.req.prompt), len(s.out))
        out.error = error
        self._safe_emit(s.req, out)

    def _emit_final(self, req: Request, reason: str, n_out: int) -> None:
        self.finished[reason] += 1
        self._safe_emit(req, Output(req.id, req.index, [], "", None, reason, len(req.prompt), n_out))

    def _safe_emit(self, req: Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop working for it
            log.exception("could not deliver output of request %s; cancelling it", req.id)
            req.cancelled = True

    def fail_all(self, message: str) -> None:
        """After an unexpected error in a forward: end every admitted request with it, keep serving."""
        for s in self.prefilling + self.running:
            self._finish(s, "error", error=message)


def _one(lp: TokenLogprob | None) -> list[TokenLogprob] | None:
    return None if lp is None else [lp]


def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [V] → the chosen token's log-probability under the model and the k most likely tokens."""
    logp = logits.log_softmax(dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[0]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)
