"""H2O scores for the decode steps the fused C++ step ran (models/kv_policy.py's HeavyHitters).

H2O keeps the keys with the most accumulated attention, so every query's attention probabilities must
reach the scores. The fused decode step (models/fused.py, kernels/decode.cpp) runs all layers in one
call and shows neither its queries nor its attention weights, and a query needs its layer's input,
which only a forward computes. So an H2O cache records the token ids and positions of the decode
steps it did not see and, right before its next eviction (the only moment the scores are read),
replays them: one module-path forward of those m tokens as a [1, m] batch (m ≤ the eviction chunk:
one GEMM per Linear instead of m GEMVs), each token at its own position, attending to the keys the
cache holds at positions ≤ its own, which are the keys its decode step saw (nothing is evicted in
between: the replay runs before the eviction). The cache is read, never written.

The replayed queries and probabilities are the decode steps' up to float rounding: the fused step and
the module path sum in different orders, and with int8 decode activations (models/fused.py) the fused
step's keys and hidden states carry that rounding too; the replay reads the keys the fused step wrote.
The scores are thus the module path's, and the eviction decisions equal unless two keys tie to that
rounding (tests/models/test_kv_policy_fused.py checks them equal on a tiny model). Cost: one forward
of `chunk` tokens per `chunk` decode steps, the last layer's MLP skipped.
"""

from __future__ import annotations

import torch

from leanformer.models.kv_cache import Step


class ReplayView:
    """The cache as a replay forward sees it: update() returns `slot`'s stored keys and values
    [1, KV, S, D] (dequantized when int8) without writing, and adds the replayed queries' attention to
    the H2O scores. `base` is the PolicyCache (observe_queries' hooks recognise the view by it)."""

    fused_layout = False  # never the C++ step: the queries are the point

    def __init__(self, cache, slot: int) -> None:
        self.base, self.slot = cache, slot

    def update(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
        c, s, n = self.base, self.slot, step.key_len
        keys, values = c.k[layer][s : s + 1, :, :n], c.v[layer][s : s + 1, :, :n]  # [1, KV, S, D]
        keys, values = keys.to(c.dtype), values.to(c.dtype)  # int8 codes / fp16 storage
        if c.quantized:
            keys = keys * c.k_scale[layer][s : s + 1, :, :n]
            values = values * c.v_scale[layer][s : s + 1, :, :n]
        q = c.queries.pop(layer, None)  # [1, H, m, D], left by observe_queries' hook
        if q is not None:
            c.score(layer, step, q, keys)
        return keys, values


@torch.inference_mode()
def replay(model, cache, slot: int, positions: list[int], ids: list[int]) -> None:
    """Score the tokens `ids` at cache `positions` of `slot` (already in the cache) as their decode
    steps would have: a Llama-family module-path forward over the view (see the module docstring)."""
    length = int(cache.lengths[slot])
    pos = torch.tensor([positions])  # [1, m]
    mask = torch.arange(length)[None, None, None, :] <= pos[:, None, :, None]  # [1, 1, m, S]: causal
    rope_pos = pos + cache.offsets[slot]  # the true positions (tokens evicted before stay counted)
    step = Step(torch.tensor([slot]), pos, length, mask, False, None, rope_pos)
    view = ReplayView(cache, slot)
    cache.last_step, cache.queries, cache.replaying = step, {}, True
    try:
        x = model.model.embed_tokens(torch.tensor([ids]))  # [1, m, hidden]
        rope = model.rotary(rope_pos, x.dtype)
        layers = model.model.layers
        for layer in layers[:-1]:
            x = layer(x, rope, view, step)
        last = layers[-1]  # its attention scores; its MLP output is never read
        last.self_attn(last.input_layernorm(x), rope, view, step)
    finally:
        cache.replaying = False
