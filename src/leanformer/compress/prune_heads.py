"""Attention-head pruning that shrinks a Llama-family decoder and respects GQA groups (PruneHeads).

Layout (models/layers.py Attention): qkv_proj rows are [H query heads | KV key heads | KV value heads],
each head_dim D rows; query head i reads KV head i // (H / KV) (contiguous groups, as SDPA's enable_gqa).
o_proj reads a = attention output [T, H * D], head h in columns h*D:(h+1)*D.

Importance of query head h: its output energy on calibration text, what it adds to the residual stream,
    e_h = sum_t ||W_o[:, h] a_h,t||^2 = tr(W_h G_hh W_h^T),   G = a^T a  ([H*D, H*D], calibrate.collect_stats)
(exact, and tighter than the upper bound ||a_h|| * ||W_o[:, h]|| since it sees how a_h lines up with
W_o's columns; a Taylor score would need gradients, i.e. a backward pass per batch). A KV group's score
is the sum over its query heads. Two GQA-safe moves, both in every targeted layer:
  - query heads: every group keeps its `keep` highest-scoring query heads (the same number per group,
    so H / KV stays integral);
  - KV groups: the lowest-scoring groups go whole (key + value head and all their query heads); the same
    number in every layer, so the KV cache (one [slots, KV, seq, D] per layer) keeps one shape.
With refit, o_proj's kept columns S are the least-squares fit of the dense output (as PruneFFN):
    W' = W G[:, S] (G[S, S] + damp)^-1
Layers are walked in order (calibrate.iter_scopes), each scored on the outputs of the pruned layers
before it. The config records num_attention_heads_per_layer / num_key_value_heads / head_dim, which
models/llama.py reads, so save -> load rebuilds the smaller shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress.calibrate import BlockHooks, Calibration, collect_stats, iter_scopes
from leanformer.compress.config import PruneHeads
from leanformer.compress.structured import rebuilt_like, record_widths
from leanformer.errors import LeanformerError


def head_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The selected o_proj names of leanformer Llama-family attention layers (fused float qkv_proj)."""
    out = []
    for n in names:
        if not n.endswith("self_attn.o_proj"):
            continue
        attn = model.get_submodule(n.rsplit(".", 1)[0])
        if isinstance(getattr(attn, "qkv_proj", None), nn.Linear) and hasattr(attn, "n_kv_heads"):
            out.append(n)
    if not out:
        raise LeanformerError(
            "PruneHeads: no float Llama-family attention (qkv_proj + o_proj) among the targets; "
            "prune before quantizing, on a decoder loaded by leanformer"
        )
    return out


def plan_counts(model: nn.Module, cfg: PruneHeads, names: list[str]) -> tuple[int, int]:
    """(query heads per KV group kept, KV heads kept) for every targeted layer, checked before any work."""
    layers = model.model.layers
    attns = [layer.self_attn for layer in layers]
    kv = attns[0].n_kv_heads
    if any(a.n_kv_heads != kv for a in attns):
        raise LeanformerError("PruneHeads: the layers have different KV head counts; prune a model as loaded")
    targeted = {n.rsplit(".", 1)[0] for n in names}
    groups = {a.n_heads // kv for i, a in enumerate(attns) if f"model.layers.{i}.self_attn" in targeted}
    if len(groups) != 1:
        raise LeanformerError("PruneHeads: the targeted layers were already head-pruned unevenly; prune once")
    group = groups.pop()
    kv_keep = cfg.kv_heads if cfg.kv_heads is not None else kv - round(kv * cfg.kv_sparsity)
    if not 1 <= kv_keep <= kv:
        raise LeanformerError(f"PruneHeads: keeps {kv_keep} KV heads; the model has {kv} (keep 1 to {kv})")
    if kv_keep < kv and len(targeted) != len(attns):
        raise LeanformerError(
            "PruneHeads: KV groups go in every layer (the KV cache has one shape); target every layer's o_proj"
        )
    if cfg.heads is not None:
        if cfg.heads % kv_keep or not 1 <= cfg.heads // kv_keep <= group:
            raise LeanformerError(
                f"PruneHeads: heads={cfg.heads} breaks the GQA ratio: with {kv_keep} KV heads it must be a "
                f"multiple of {kv_keep} up to {kv_keep * group} (groups of {group} query heads)"
            )
        per_group = cfg.heads // kv_keep
    else:
        per_group = max(1, group - round(group * cfg.sparsity))
    if per_group == group and kv_keep == kv:
        raise LeanformerError(
            f"PruneHeads: sparsity {cfg.sparsity:g} removes no head from groups of {group} query heads "
            f"(and no KV group); remove at least 1 / {2 * group:g} or set heads / kv_heads"
        )
    return per_group, kv_keep


def head_energy(w_o: torch.Tensor, gram: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[H] output energy tr(W_h G_hh W_h^T) of each head; w_o [hidden, H*D], gram [H*D, H*D]."""
    d = w_o.shape[1] // n_heads
    out = torch.empty(n_heads)
    for h in range(n_heads):
        c = slice(h * d, (h + 1) * d)
        w = w_o[:, c]  # [hidden, D]
        out[h] = ((w @ gram[c, c]) * w).sum().clamp_min(0)
    return out


def choose_heads(
    energy: torch.Tensor, n_kv: int, per_group: int, kv_keep: int
) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads), both in original order, from per-head energies [H]."""
    by_group = energy.view(n_kv, -1)  # [KV, H / KV]: query heads are contiguous per KV group
    group = by_group.shape[1]
    kv_kept = torch.topk(by_group.sum(1), kv_keep).indices.sort().values.tolist()
    q_kept = []
    for g in kv_kept:
        top = torch.topk(by_group[g], per_group).indices.sort().values
        q_kept.extend((g * group + top).tolist())
    return q_kept, kv_kept


@torch.no_grad()
def shrink_attention(
    attn: nn.Module, gram: torch.Tensor, per_group: int, kv_keep: int, cfg: PruneHeads
) -> None:
    """Keep the most important heads of one attention layer in place (new, smaller Linears)."""
    qkv, o = attn.qkv_proj, attn.o_proj
    h, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_o = o.weight.float()  # [hidden, H*D]
    q_kept, kv_kept = choose_heads(head_energy(w_o, gram, h), kv, per_group, kv_keep)
    cols = torch.tensor([c for q in q_kept for c in range(q * d, (q + 1) * d)])  # kept o_proj columns
    rows = torch.cat(
        [cols] + [torch.arange((base + k) * d, (base + k + 1) * d) for base in (h, h + kv) for k in kv_kept]
    )  # qkv_proj rows: kept query heads, then kept key heads, then kept value heads
    new_o = w_o[:, cols]
    if cfg.refit:  # least squares on the calibration attention outputs: W G[:, S] (G[S, S] + λ I)^-1
        g_ss = gram[cols][:, cols]
        g_ss = g_ss + torch.eye(len(cols)) * cfg.damp * torch.diagonal(g_ss).mean().clamp_min(1e-8)
        new_o = torch.linalg.solve(g_ss, (w_o @ gram[:, cols]).T).T
    dev, dt = qkv.weight.device, qkv.weight.dtype
    new_qkv = nn.Linear(qkv.in_features, len(rows), bias=qkv.bias is not None, device=dev).to(dt)
    new_qkv.weight.copy_(qkv.weight[rows])
    if qkv.bias is not None:
        new_qkv.bias.copy_(qkv.bias[rows])
    new_out = nn.Linear(len(cols), o.out_features, bias=o.bias is not None, device=o.weight.device)
    new_out = new_out.to(o.weight.dtype)
    new_out.weight.copy_(new_o.to(o.weight.dtype))
    if o.bias is not None:
        new_out.bias.copy_(o.bias)
    attn.qkv_proj, attn.o_proj = rebuilt_like(qkv, new_qkv), rebuilt_like(o, new_out)
    attn.n_heads, attn.n_kv_heads = len(q_kept), kv_keep


def prune_heads(
    model: nn.Module,
    cfg: PruneHeads,
    names: list[str],
    calibration: Calibration,
    progress: bool = True,
    hooks: BlockHooks | None = None,
) -> None:
    """Shrink the attention layers owning the o_proj `names` (plan_counts checked first), then record
    every layer's head counts in the config; `hooks` stream the blocks in and out (compress/stream.py)."""
    per_group, kv_keep = plan_counts(model, cfg, names)
    scopes = iter_scopes(model, names, calibration, cfg.batch_size, progress, "PruneHeads", hooks)
    for scope in scopes:
        for st in collect_stats(model, scope):
            for name in st.names:
                attn = model.get_submodule(name.rsplit(".", 1)[0])
                shrink_attention(attn, st.gram, per_group, kv_keep, cfg)
            del st.gram
    record_widths(model)
