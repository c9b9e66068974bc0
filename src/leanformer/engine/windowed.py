"""Continuous batching with a sliding window + attention sinks (StreamingLLM): `serve --window W --sinks S`.

WindowScheduler is the Scheduler (engine/scheduler.py) over a PolicyCache(SinkWindow) from
models/kv_policy.py: each request keeps its first `sinks` tokens and its newest `window` tokens, so it
may run past the model's context (up to the server's --max-seq per request) in a fixed slot of
sinks + window + chunk tokens. Positions are positions in the cache: when a slot slides, the kept keys
move down and their RoPE rotation is undone by the distance moved (kv_policy.py), exactly as
`lf.generate(..., kv_policy=SinkWindow(...))` does.

Why slots and not the paged cache: sliding moves and re-rotates the kept keys of a slot in place, which
a block shared through the prefix cache must never see; so a window server runs on static slots (the
server says so in its start-up line) and prefix caching is off.

Exactness against generate(): a prompt is prefilled in pieces of the policy's eviction chunk (what
generate does once a sequence may outgrow the cache), and the window only slides in a forward that
holds one row (Scheduler._prefill never batches rows a padded forward would push past the cache), so
every slide happens at the same token as in generate() and greedy outputs are equal.
"""

from __future__ import annotations

from leanformer.engine.cache import plan_cache
from leanformer.engine.generate import check_policy
from leanformer.engine.request import SeqState
from leanformer.engine.scheduler import Scheduler
from leanformer.errors import LeanformerError
from leanformer.models.kv_policy import PolicyCache, SinkWindow


class WindowScheduler(Scheduler):
    """Scheduler whose slots slide (sinks + window); requests of up to `max_seq` tokens, past the context."""

    def __init__(
        self,
        model,
        tok,
        n_slots: int,
        max_seq: int,
        policy: SinkWindow,
        prefill_chunk: int = 256,
        max_waiting: int = 256,
    ) -> None:
        if not isinstance(policy, SinkWindow):
            raise LeanformerError(
                "the server's KV policy is a sliding window (--sinks/--window); eviction by budget "
                "(--kv-budget/--evict) runs in generate/chat only"
            )
        check_policy(policy, model.args.max_position_embeddings, max_seq, None)
        cache = PolicyCache.for_model(model, n_slots, policy, max_seq, 0)
        super().__init__(model, tok, n_slots, cache.max_seq, prefill_chunk, max_waiting, cache=cache)
        self.policy = policy
        self.max_seq = max_seq  # the request limit (prompt + max_tokens); the slot is smaller
        if cache.may_evict:  # prompts in generate()'s pieces, so the window slides at the same tokens
            self.row_chunk = cache.piece
            self.prefill_chunk = max(self.prefill_chunk, cache.piece)

    def _claim(self, seq: SeqState) -> bool:
        self.cache.offsets[seq.slot] = 0  # a reused slot starts at RoPE position 0 again
        return True


def window_scheduler(
    model, tok, policy: SinkWindow, max_batch: int, max_seq: int, kv_budget_mb: float | None,
    prefill_chunk: int, max_waiting: int,
) -> WindowScheduler:  # fmt: skip
    """As many window slots (≤ max_batch) as kv_budget_mb holds."""
    if not isinstance(policy, SinkWindow):
        raise LeanformerError("serve takes a sliding-window KV policy: SinkWindow(sinks, window)")
    slot = min(max_seq, policy.capacity())
    n_slots, _ = plan_cache(model, max_batch, slot, kv_budget_mb)
    return WindowScheduler(model, tok, n_slots, max_seq, policy, prefill_chunk, max_waiting)


def describe_window(s: WindowScheduler) -> str:
    c, p = s.cache, s.policy
    mb = c.nbytes() / 2**20
    return (
        f"KV cache: {c.n_slots} slots × {c.max_seq} tokens = {mb:.0f} MB, sliding window (sinks {p.sinks} + "
        f"window {p.window}, chunk {p.step}) on static slots (the paged cache does not slide), requests of "
        f"≤ {s.max_seq} tokens"
    )
