"""The decode steps of one generate loop from token ids to logits, one C++ call each, with the per-step
checks done once for the loop.

Why: at batch 1 the fused C++ step (fused.py, kernels/decode.cpp) takes ~3 ms of SmolLM2's ~3.6 ms
token on a 2-core CPU; most of the rest was Python doing the same thing every step: `DecodePlan.get`'s
check that no module or tensor was swapped (~750 identity tests, ~0.2 ms: every token streams ~100 MB of
weights through the caches, so each test misses), `cache.begin` (positions, a mask the fused step never
reads), `usable_tokens`' conditions, the RoPE rows, `[:, -1].float()` (~0.3 ms in all, measured per step
in docs/BENCHMARKS.md "Session 13"). Here the stack, the int8 decision, the RoPE table and the cache's
layout are taken once, and a step is: two table lookups, the C++ call, the cache lengths advanced.

The contract that makes skipping the check sound: the model does not change while the loop runs. Only
loops whose caller is leanformer's own code between steps use it (engine/generate.py's `generate`, the
bench's timing loop); `stream_generate` and `decode` by default hand each step to the caller, who may
change the model between two steps, and keep the per-step check. A `DecodePlan.reset()` (the model's
`.to()` / `.float()`) still ends it: each step compares the plan's stack to its own (one attribute).
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer import kernels
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.fused import DecodePlan, arm_tokens
from leanformer.models.kv_cache import KVCache


class FusedSteps:
    """Greedy-loop steps for `model` over a slot-major `cache`: `steps(tokens, rows)` -> logits [B, V]."""

    def __init__(self, model: nn.Module, cache: KVCache, stack, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.model, self.cache, self.stack = model, cache, stack
        self.cos, self.sin = cos, sin  # [L, D] float32 each, L >= the cache's positions

    @classmethod
    def start(cls, model: nn.Module, cache) -> FusedSteps | None:
        """The runner, or None where a step must take model.forward (another cache type or model, no
        kernels, grad or tracing on, hooks on the model itself (a profiler's forward timer: they must see
        every step) or on the embedding / norm / head, positions past the RoPE table, a stack that does not
        run from ids to logits)."""
        plan = getattr(model, "_decode_plan", None)
        if (
            not isinstance(plan, DecodePlan)
            or type(cache) is not KVCache  # policy / paged caches keep their own step planning
            or cache.n_slots > MAX_ROWS
            or cache.dtype != torch.float32
            or not cache.k[0].is_cpu
            or kernels.hooked(model)
        ):
            return None
        probe = torch.zeros(1, 1, dtype=torch.long)
        if not DecodePlan.usable_tokens(model, probe, cache):
            return None
        stack = plan.get(model)
        table = model.rotary.table(cache.max_seq)
        if stack is None or not stack.has_ends or table is None:
            return None
        arm_tokens(model, stack)
        return cls(model, cache, stack, table[:, 0].contiguous(), table[:, 1].contiguous())

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """tokens [B] int64 appended to slots `rows` [B] -> logits [B, V] float32, the cache advanced;
        None (nothing done) when the model's plan was reset since the start: take model.forward then."""
        if self.model._decode_plan.stack is not self.stack:
            return None
        c = self.cache
        pos = c.lengths.index_select(0, rows)
        logits = self.stack.forward_tokens(
            tokens, self.cos.index_select(0, pos), self.sin.index_select(0, pos), c.k, c.v, c.k_scale, c.v_scale,
            rows, pos, None, None,
        )  # fmt: skip
        c.lengths.index_add_(0, rows, torch.ones_like(rows))
        return logits
