"""What the scheduler takes in and gives back (Request, Output) and its per-request state (SeqState).

Apart from scheduler.py so that file is only the batching logic.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leanformer.engine.detokenize import Detokenizer
from leanformer.engine.sampling import SamplingParams, clean_logits
from leanformer.errors import LeanformerError


class QueueFull(LeanformerError):
    """Every slot is taken and the waiting queue is at its bound: come back later (HTTP 429 + Retry-After)."""


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
    speculative: str | None = None  # "prompt-lookup": drafts verified in the batch (engine/spec_batch.py)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False  # set from any thread (Engine.cancel); acted on at the next step
    submitted: float = 0.0
    ended: bool = False  # its final output was sent (engine thread); guards against a second one


class SeqState:
    """Engine-side state of an admitted request."""

    def __init__(self, req: Request, slot: int, tok, vocab: int) -> None:
        self.req, self.slot = req, slot
        # tokens to prefill: the prompt, or after a preemption (engine/paged.py) the prompt + all but
        # the last generated token, recomputed; `resumed` then says the next token is already chosen
        self.fill: list[int] = req.prompt
        self.resumed = False
        self.prefilled = 0  # tokens of `fill` already in the cache
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


def one(lp: TokenLogprob | None) -> list[TokenLogprob] | None:
    return None if lp is None else [lp]


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [V] → the chosen token's log-probability under the model and the k most likely tokens."""
    # cleaned and floored at -9999 (as OpenAI does) so that NaN / -inf never reach JSON, which has neither
    logp = clean_logits(logits[None])[0].log_softmax(dim=-1).clamp_min(-9999.0)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[0]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)
