"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Numerically safe for every value SamplingParams accepts: a temperature below GREEDY_BELOW is greedy
(dividing by 1e-45 overflows float32), top-p always keeps the most likely token (a top_p that rounds
to 0 in float32 used to drop them all), and NaN / ±inf logits, whether from the model or from an
extreme repetition penalty, are cleaned up before the softmax, so `torch.multinomial` never sees NaN.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from leanformer import kernels
from leanformer.errors import LeanformerError

GREEDY_BELOW = 1e-5  # temperatures under this sample like argmax anyway; argmax is exact and cannot overflow
# torch.Generator.manual_seed takes < 2^64, but 2^63 is what every client language can hold
SEED_LIMIT = 2**63


def _finite(name: str, value) -> float:
    # bool is a Real: refuse it, `temperature=True` is a bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LeanformerError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 (or < GREEDY_BELOW) → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    repetition_penalty: float = 1.0  # 1 → off (HF/CTRL convention: >1 discourages repeats)
    seed: int | None = None

    def __post_init__(self) -> None:
        # validated here so that every caller (generate(), the scheduler, the server) gets it for free
        self.temperature = _finite("temperature", self.temperature)
        self.top_p = _finite("top_p", self.top_p)
        self.repetition_penalty = _finite("repetition_penalty", self.repetition_penalty)
        if self.temperature < 0:
            raise LeanformerError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LeanformerError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise LeanformerError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise LeanformerError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT
        ):
            raise LeanformerError(f"seed must be an integer in [0, 2^63), got {seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN → -inf (never chosen), +inf → the largest float (still the favourite, but comparable), and a
    row with no finite value left → all 0 (uniform): softmax of the result is never NaN."""
    big = torch.finfo(logits.dtype).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return logits.masked_fill(dead, 0.0) if bool(dead.any()) else logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] → argmax [B]. argmax picks a NaN when a row has one: only then clean the rows.

    On CPU fp32, the kernels' `greedy` (clean_logits' rules in one threaded pass, kernels/argmax.cpp:
    ~110 µs of a SmolLM2 decode step at batch 1 with numpy's argmax, which read the other core's half of
    the logits), else numpy's argmax (torch's took ~130 µs per 49,152-entry row, numpy's ~5 µs warm);
    all return the first maximum."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]:
        if kernels.available():
            return kernels.ext().greedy(logits.detach())
        tokens = torch.from_numpy(logits.detach().numpy().argmax(-1))
    else:
        tokens = logits.argmax(dim=-1)
    if bool(torch.isnan(logits.gather(-1, tokens[:, None])).any()):
        tokens = clean_logits(logits).argmax(dim=-1)
    return tokens


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool marks tokens already in each sequence. An extreme penalty can
    make ±inf / NaN here (1e-300 is 0 in float32): callers clean the result (see `sample`)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """logits [B, V] (float32) → next tokens [B]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return greedy_tokens(logits)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] → the distributions `sample` draws from [N, V] (temperature, top-k, top-p); the
    speculative verifier compares draft and target through the same function."""
    logits = clean_logits(logits)
    # shift each row's best logit to 0 before dividing: a small temperature then pushes the others
    # towards -inf instead of the best one to +inf (inf - inf = NaN inside softmax)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays (top_p may round to 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)
