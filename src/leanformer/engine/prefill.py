"""Prompts into the KV cache → the logits at each prompt's last token (engine/generate.py, and the
schedulers' prefill chunks).

Prompts go through the fused decode step (kernels/decode.cpp) as chained one-token rows, every prompt
token a row at its own position of its slot (engine/spec_chain.Chain, the shape speculative verification
uses): no module calls, the LM head only on the rows whose logits are wanted. Where every Linear of the
stack is int4 on int8 activations, one step takes up to GEMM_CHAIN_MAX rows and its Linears run the
int4 GEMM past 16 rows (kernels/decode_linear.h); otherwise steps of MAX_ROWS rows (the GEMVs read each
weight once for up to 16), up to CHAIN_MAX tokens. SmolLM2 Q4_0 on 2 Zen 5 cores: time to the first
token 1.2-2.7x the padded forward's at 9-512 tokens (docs/BENCHMARKS.md, Session 16). The rows take the
decode step's activations; on fp32 activations the logits equal the padded forward's to fp32 rounding
(tests/engine/test_prefill.py). Anything else (longer, a KV policy or window cache, a model the fused
step cannot take): one forward over the right-padded prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.engine.spec_chain import Chain
from leanformer.models.fused import DecodePlan, int8_activations
from leanformer.models.kv_cache import KVCache
from leanformer.models.paged_cache import PagedKVCache

MAX_ROWS = 16  # rows per fused step (its GEMVs read each weight once for up to 16 rows)
CHAIN_MAX = 32  # one prompt of up to this many tokens, in fused steps of MAX_ROWS rows
# rows of one fused step whose int4 Linears take the GEMM: 1.2-1.7x the padded forward at 17-1024 tokens,
# 1.05x at 2048 (the step's attention, row by row, against SDPA's blocked kernel)
GEMM_CHAIN_MAX = 1024


def prefill(model: nn.Module, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """prompts[i] into slot i of `cache` (lengths set) → float logits [len(prompts), V] at each one's
    last token."""
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = chained(model, cache, [(i, 0, p) for i, p in enumerate(prompts)])
    if logits is None:
        ids = torch.zeros(n, int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        logits = model(ids, cache=cache, slots=torch.arange(n), logits_at=lengths - 1)[:, -1]
    cache.set_length(torch.arange(n), lengths)
    return logits.float()


def chained(model: nn.Module, cache, pieces: list[tuple[int, int, list[int]]]) -> torch.Tensor | None:
    """pieces (slot, first position, tokens) as chained rows of fused steps → the logits at each piece's
    last token [n, V], or None if they cannot go that way. Steps of MAX_ROWS rows (each reads the keys the
    ones before it wrote): several pieces of MAX_ROWS tokens in all, or one of up to CHAIN_MAX; where every
    Linear of the stack takes the int4 GEMM on int8 activations, one step of up to GEMM_CHAIN_MAX rows.
    The cache's lengths are left to the caller."""
    rows = sum(len(t) for _, _, t in pieces)
    if rows < 2 or type(cache) not in (KVCache, PagedKVCache):
        return None  # (KV policies, window caches: their own begin(), which Chain would bypass)
    slots = [s for s, _, t in pieces for _ in t]
    positions = [p0 + j for _, p0, t in pieces for j in range(len(t))]
    plan = getattr(model, "_decode_plan", None)
    probe = torch.zeros(min(rows, MAX_ROWS), 1, dtype=torch.long)  # whether the fused step may run at all
    if plan is None or not DecodePlan.usable_tokens(model, probe, Chain(cache, slots, positions)):
        return None  # (before get(): a split model's layers are not the stack's to build)
    stack = plan.get(model)
    if stack is None:
        return None
    gemm = int8_activations(model) and stack.gemm_linears() == 4 * len(stack)
    limit = GEMM_CHAIN_MAX if gemm else CHAIN_MAX if len(pieces) == 1 else MAX_ROWS
    step_rows = GEMM_CHAIN_MAX if gemm else MAX_ROWS
    if rows > limit:
        return None
    ids = torch.tensor([x for _, _, t in pieces for x in t])
    ends = (torch.tensor([len(t) for _, _, t in pieces]).cumsum(0) - 1).tolist()  # each piece's last row
    out = []
    for lo in range(0, rows, step_rows):
        hi = min(lo + step_rows, rows)
        keep = [e - lo for e in ends if lo <= e < hi] or [hi - lo - 1]  # the head on these rows only
        view = Chain(cache, slots[lo:hi], positions[lo:hi], step_rows, torch.tensor(keep))
        logits = model(ids[lo:hi, None], cache=view, slots=torch.tensor(slots[lo:hi]))
        if logits.shape[0] != len(keep):  # the head ran in torch, on every row (a stack without ends)
            logits = logits[torch.tensor(keep)]
        out += [logits[i, -1] for i, e in enumerate(keep) if lo + e in ends]
    return torch.stack(out)
