"""The KV policies as settings (models/kv_policy.py's PolicyCache applies them): SinkWindow (StreamingLLM),
HeavyHitters (H2O) and SnapKV, frozen dataclasses checked when built, each saying how many tokens it
keeps for a prompt (`kept`) and how large a cache slot it needs (`capacity`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from leanformer.errors import LeanformerError


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LeanformerError(f"{name} must be an integer ≥ {low}, got {value!r}")


@dataclass(frozen=True)
class SinkWindow:
    sinks: int = 4
    window: int = 512
    chunk: int | None = None  # tokens evicted at once; None: max(1, window // 8)

    def __post_init__(self) -> None:
        _count("sinks", self.sinks, 0)
        _count("window", self.window, 1)
        if self.chunk is not None:
            _count("chunk", self.chunk, 1)

    @property
    def step(self) -> int:
        return self.chunk or max(1, self.window // 8)

    def capacity(self, prompt_len: int = 0) -> int:
        return self.sinks + self.window + self.step


@dataclass(frozen=True)
class HeavyHitters:
    budget: int | float  # tokens kept after an eviction; a float in (0, 1): that share of the prompt
    sinks: int = 4
    recent: int | None = None  # newest tokens always kept; None: half the budget (as in H2O)
    chunk: int | None = None  # tokens evicted at once; None: max(1, budget // 8)

    def __post_init__(self) -> None:
        _budget(self.budget)
        _count("sinks", self.sinks, 0)
        if self.recent is not None:
            _count("recent", self.recent, 0)
        if self.chunk is not None:
            _count("chunk", self.chunk, 1)

    def kept(self, prompt_len: int) -> int:
        return _tokens(self.budget, prompt_len, self.sinks)

    def capacity(self, prompt_len: int) -> int:
        kept = self.kept(prompt_len)
        return kept + (self.chunk or max(1, kept // 8))


@dataclass(frozen=True)
class SnapKV:
    budget: int | float  # prompt tokens kept; a float in (0, 1): that share of the prompt
    sinks: int = 4
    observe: int = 32  # the last prompt queries that vote
    pool: int = 7  # max-pool width over neighbouring keys (keeps whole phrases, as in SnapKV)

    def __post_init__(self) -> None:
        _budget(self.budget)
        _count("sinks", self.sinks, 0)
        _count("observe", self.observe, 1)
        _count("pool", self.pool, 1)

    def kept(self, prompt_len: int) -> int:
        return _tokens(self.budget, prompt_len, self.sinks)

    def capacity(self, prompt_len: int) -> int:
        return 1 << 62  # the prompt is prefilled whole; the cache is sized by the caller


Policy = SinkWindow | HeavyHitters | SnapKV


def _budget(value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0 or (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise LeanformerError(
            f"a KV budget is a token count ≥ 1 or a share of the prompt in (0, 1), got {value!r}"
        )


def _tokens(budget: int | float, prompt_len: int, sinks: int) -> int:
    n = math.ceil(budget * prompt_len) if isinstance(budget, float) and budget < 1 else int(budget)
    return max(n, sinks + 1)
