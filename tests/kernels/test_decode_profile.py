"""DecodeStack.profile: the fused decode step timed phase by phase (scripts/profile_decode_rows.py) without
changing its result."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")

H, KV, D, HIDDEN, INTER, LAYERS, M = 2, 1, 32, 64, 96, 2, 3


def _stack():
    e, g = K.ext(), torch.Generator().manual_seed(0)

    def lin(n: int, k: int):
        return e.DecodeLinear("f32", torch.randn(n, k, generator=g) * 0.1, None, None, None, None, 0, 0)

    stack = e.DecodeStack()
    for _ in range(LAYERS):
        qkv, o = lin((H + 2 * KV) * D, HIDDEN), lin(HIDDEN, H * D)
        stack.add(torch.ones(HIDDEN), 1e-5, qkv, o, torch.ones(HIDDEN), 1e-5, lin(2 * INTER, HIDDEN),
                  lin(HIDDEN, INTER), H, KV, D)  # fmt: skip
    return stack


def _step(stack, x: torch.Tensor) -> torch.Tensor:
    k = [torch.zeros(1, KV, 8, D) for _ in range(LAYERS)]
    v = [torch.zeros(1, KV, 8, D) for _ in range(LAYERS)]
    cos, sin = torch.ones(M, D), torch.zeros(M, D)
    return stack.forward(x, cos, sin, k, v, [], [], torch.zeros(M, dtype=torch.long), torch.arange(M))


def test_profile_times_each_phase_and_changes_nothing():
    stack, x = _stack(), torch.randn(M, HIDDEN)
    plain = _step(stack, x)
    assert stack.profile == []  # off by default
    stack.profile = [0.0] * 7  # norms+residuals, qkv, attention, o, gate_up, silu, down
    timed = _step(stack, x)
    assert torch.equal(plain, timed)
    assert len(stack.profile) == 7 and min(stack.profile) >= 0 and sum(stack.profile) > 0
    first = list(stack.profile)
    _step(stack, x)
    assert all(b >= a for a, b in zip(first, stack.profile)) and sum(stack.profile) > sum(
        first
    )  # accumulates
