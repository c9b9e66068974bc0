"""Attention-head pruning for BERT-family encoders: importance on calibration text, then physical removal.

Importance (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): multiply each head's output
by a mask variable ξ = 1 and accumulate |∂L/∂ξ| over calibration batches, normalized per layer. With no
labels at hand, L is self-supervised: for an embedding model, an in-batch contrastive loss against the
model's own (detached) embeddings — how much each head helps tell the batch's sentences apart; for a
classifier, cross-entropy against its own predictions. method="norm" instead ranks heads by the mean
norm of their contribution to the residual stream (‖W_O[:, h] o_h‖), forward only.

Removal slices the head's rows out of the fused qkv matmul and its columns out of the output projection,
so the model gets smaller and faster; `config["pruned_heads"]` (original head indices, as HF wrote it)
records it so that a saved model rebuilds with the same per-layer head counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.errors import LeanformerError
from leanformer.kernels.modules import plain_linears


def _slice_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """A new Linear keeping weight rows (outputs) / columns (inputs); repacked if the old one was packed."""
    from leanformer.kernels.h16 import H16Linear

    if type(old) is not nn.Linear and not hasattr(old, "packed_weight") and not isinstance(old, H16Linear):
        raise LeanformerError(f"cannot prune heads of a {type(old).__name__}: prune before quantizing")
    w, b = old.weight.detach(), None if old.bias is None else old.bias.detach()
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(1, 1, bias=b is not None, device="meta")  # shapes set below (may be 0: no init warning)
    new.in_features, new.out_features = w.shape[1], w.shape[0]
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    if hasattr(old, "packed_weight") and w.numel():  # oneDNN has no primitive for an empty weight
        from leanformer.kernels.packed import PackedLinear

        new = PackedLinear.from_linear(new)
    if isinstance(old, H16Linear) and w.numel():
        new = H16Linear.from_linear(new)
    return new


def prune_heads_(model, heads: dict[int, list[int]]):
    """Remove attention heads in place. heads: layer → original head indices (already-pruned ones ignored).

    Shrinks each layer's qkv rows [3·H·D → 3·H'·D] and attn_out columns [H·D → H'·D].
    """
    a = model.args
    for layer_idx, remove in heads.items():
        li = int(layer_idx)
        if not 0 <= li < a.num_hidden_layers:
            raise LeanformerError(f"layer {li} out of range: the model has {a.num_hidden_layers} layers")
        bad = [h for h in remove if not 0 <= int(h) < a.num_attention_heads]
        if bad:
            raise LeanformerError(f"head {bad[0]} out of range: layers have {a.num_attention_heads} heads")
        done = set(a.pruned_heads.get(li, []))
        current = [h for h in range(a.num_attention_heads) if h not in done]  # original ids, current order
        drop = {int(h) for h in remove} - done
        if not drop:
            continue
        keep = torch.tensor([i for i, h in enumerate(current) if h not in drop], dtype=torch.long)
        layer, h, d = model.layers[li], len(current), a.head_dim
        cols = (keep[:, None] * d + torch.arange(d)).reshape(-1)  # this layer's kept [H'·D] features
        rows = torch.cat([p * h * d + cols for p in range(3)])  # the same features of q, k and v
        layer.qkv = _slice_linear(layer.qkv, rows=rows)
        layer.attn_out = _slice_linear(layer.attn_out, cols=cols)
        layer.heads = len(keep)
        a.pruned_heads[li] = sorted(done | drop)
    model.config["pruned_heads"] = {str(k): v for k, v in sorted(a.pruned_heads.items()) if v}
    return model


def _self_supervised_loss(model, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, hidden] → a scalar whose gradient says which heads matter (see module docstring)."""
    if model.head is not None or model.probe is not None:
        logits = model.head(hidden) if model.head is not None else model.probe(model.pool(hidden, mask))
        return F.cross_entropy(logits, logits.detach().argmax(-1))
    e = model.pool(hidden, mask, normalize=True)  # [B, D]
    sims = e @ e.detach().T / 0.05  # [B, B], temperature 0.05 as in SimCSE
    return F.cross_entropy(sims, torch.arange(len(e)))


def head_importance(model, tok, texts: list[str], method: str = "taylor", batch_size: int = 32):
    """Per-layer importance [heads] of every remaining head on calibration texts (higher = keep)."""
    from leanformer.encoders.embed import length_sorted_batches

    if method not in ("taylor", "norm"):
        raise LeanformerError(f"unknown head-importance method {method!r}; choose taylor or norm")
    if not texts:
        raise LeanformerError("head importance needs calibration texts")
    scores = [torch.zeros(layer.heads) for layer in model.layers]
    with plain_linears(model):
        for _, ids, mask in length_sorted_batches(model, tok, texts, batch_size):
            if method == "taylor":
                xi = [torch.ones(layer.heads, requires_grad=True) for layer in model.layers]
                with torch.enable_grad():
                    loss = _self_supervised_loss(model, model(ids, mask, head_mask=xi), mask)
                    grads = torch.autograd.grad(loss, [x for x in xi if x.numel()], allow_unused=True)
                it = iter(grads)
                for s, x in zip(scores, xi):
                    g = next(it) if x.numel() else None
                    if g is not None:
                        s += g.abs()
            else:
                _add_output_norms(model, ids, mask, scores)
    # Michel et al. normalize per layer (L2) so that layers compare on one scale
    return [s / s.norm().clamp(min=1e-12) if s.numel() else s for s in scores]


def _add_output_norms(model, ids, mask, scores: list[torch.Tensor]) -> None:
    """scores[l][h] += Σ over real tokens of ‖W_O[:, h] o_h‖ (each head's write into the residual stream)."""
    real = mask.reshape(-1).bool()  # [B*T]

    def hook(layer, li):
        def fn(_mod, inputs):
            o = inputs[0][real].view(-1, layer.heads, layer.head_dim)  # [N, H, D]
            w = layer.attn_out.weight.view(-1, layer.heads, layer.head_dim)  # [hidden, H, D]
            scores[li] += torch.einsum("nhd,ohd->nho", o, w).norm(dim=-1).sum(0)  # [H]

        return fn

    layers = [(i, layer) for i, layer in enumerate(model.layers) if layer.heads]
    handles = [layer.attn_out.register_forward_pre_hook(hook(layer, i)) for i, layer in layers]
    try:
        with torch.inference_mode():
            model(ids, mask)
    finally:
        for h in handles:
            h.remove()


def prune_heads_auto_(
    model,
    tok,
    calibration_texts: list[str],
    fraction: float,
    method: str = "taylor",
    steps: int = 4,
    batch_size: int = 32,
) -> dict[int, list[int]]:
    """Remove the least important `fraction` of all original heads, in `steps` rounds (importance is
    recomputed after each round, as Michel et al. do). Returns layer → removed original head indices."""
    if not 0 <= fraction < 1:
        raise LeanformerError(f"fraction of heads to prune must be in [0, 1), got {fraction}")
    a = model.args
    total = a.num_hidden_layers * a.num_attention_heads
    target = round(fraction * total)
    for step in range(1, max(1, steps) + 1):
        remaining = sum(a.heads_per_layer)
        n = round(target * step / max(1, steps)) - (total - remaining)
        if n <= 0:
            continue
        imp = head_importance(model, tok, calibration_texts, method, batch_size)
        ranked = []  # (importance, layer, original head id)
        for li, s in enumerate(imp):
            current = [h for h in range(a.num_attention_heads) if h not in a.pruned_heads.get(li, [])]
            ranked += [(float(v), li, current[i]) for i, v in enumerate(s)]
        plan: dict[int, list[int]] = {}
        for _, li, h in sorted(ranked)[:n]:
            plan.setdefault(li, []).append(h)
        prune_heads_(model, plan)
    return {k: list(v) for k, v in sorted(a.pruned_heads.items())}
