"""Verification of drafted tokens against the target's logits: greedy (with a tie guard) and the
rejection-sampling scheme that keeps the target's output distribution (engine/speculative.py uses both)."""

from __future__ import annotations

import torch
from torch import nn

from leanformer.engine.sampling import SamplingParams, greedy_tokens, probabilities


def verify(
    logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams, gen
) -> tuple[int, int]:
    """Target logits [k+1, V] at [last, d1..dk] → (drafts accepted, the token after them)."""
    k = len(drafts)
    if params.greedy:
        target = fast_argmax(logits.contiguous())
        n = 0
        while n < k and drafts[n] == target[n]:
            n += 1
        return n, target[n]
    p = probabilities(logits, params)  # [k+1, V]
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])  # prompt lookup: q is a point mass on d
        if float(torch.rand(1, generator=gen)) * q_d < float(p[i, d]):  # u < p/q without dividing by 0
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, int(torch.multinomial(residual[None], 1, generator=gen)[0, 0])
    return k, int(torch.multinomial(p[k : k + 1], 1, generator=gen)[0, 0])


def fast_argmax(logits: torch.Tensor) -> list[int]:
    """greedy_tokens(logits).tolist() for logits [R, V] (numpy's argmax on CPU: see greedy_tokens)."""
    return greedy_tokens(logits).tolist()


def greedy_accept(logits: torch.Tensor, drafts: list[int], margin: float) -> tuple[int, int | None]:
    """Greedy verification with a tie guard: logits [k+1, V] at [last, d1..dk] → (drafts accepted, the
    token after them, or None when that row's top-2 gap is under `margin`).

    The verification rows run the decode kernels at k+1 rows, which sum in another order than the one-row
    step of plain decoding; on fp32 activations SmolLM2's logits move by ~1e-4 (the int8-activation GEMV
    is batch-invariant: margin 0). Where the target's top two are closer than `margin`, the multi-row
    argmax may not be plain decoding's: such a row is not trusted (None), and the caller recomputes it
    with a one-row step, as plain decoding would."""
    logits = logits.contiguous()
    best = fast_argmax(logits)
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    if margin <= 0:
        return n, best[n]
    rows = torch.arange(n + 1)  # only rows 0..n are read: the gaps of the accepted ones and row n
    top = logits[rows, best[: n + 1]]
    rest = logits[: n + 1].clone()
    rest[rows, best[: n + 1]] = float("-inf")
    gap = (top - rest.amax(-1)).tolist()  # [n + 1]
    for i in range(n + 1):
        if gap[i] < margin:
            return i, None
    return n, best[n]


# Top-2 logit gap under which a verification row is recomputed by a one-row step (greedy_accept).
# fp32 activations: multi-row and one-row logits differ by ~1e-4 on SmolLM2 int4 (summation order),
# so 1e-3 makes a flipped argmax practically impossible. int8 activations (the fused step's default on
# AVX2): 0, because no margin helps there: the int8 GEMV sums a row in an order that depends on the
# call's row count, a flipped activation code moves the logits by up to ~0.9, and the K/V that accepted
# rows leave in the cache carry the difference into later plain steps (measured: at margin 1.0, 6 of 6
# open-ended SmolLM2 continuations of 128 tokens still differ from plain decoding somewhere).
# Identity on int8 activations needs row-count-independent int8 kernels (tests/engine/
# test_speculative_smollm2.py has the check, xfail until then).
TIE_MARGIN = {"int8": 0.0, "fp32": 1e-3}


def tie_margin(model: nn.Module) -> float:
    """TIE_MARGIN for the activations the model's decode step runs its Linears on."""
    from leanformer.models.fused import int8_activations

    plan = getattr(model, "_decode_plan", None)
    if plan is None or not model.fused_decode or not int8_activations(model):
        return TIE_MARGIN["fp32"]
    stack = plan.get(model)
    return TIE_MARGIN["int8" if stack is not None and stack.int8_linears() > 0 else "fp32"]
