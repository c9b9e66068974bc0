"""Structured pruning of BERT-family encoders to a share of the block parameters: attention heads and FFN
channels, physically removed (smaller matmuls), widths kept kernel-friendly.

Budget: `fraction` of the block weights (qkv, attn_out, ffn_in, ffn_out). `head_fraction` (default
fraction / 2: heads cost more STS-B per weight than FFN channels on MiniLM) of all heads
go first (encoders/prune_heads.py: Taylor importance on calibration text, in rounds); the FFN then loses
as many channels as the rest of the budget needs, the same number in every layer, each layer's width a
multiple of `multiple` (32: a whole number of AVX-512 / AVX2 register tiles in every matmul).
FFN channel j's importance in a layer (activation x weight, as compress/structured.py for decoders):
    ||a_j||_2 * ||W_out[:, j]||_2,   a [N, I] the FFN activations over the calibration tokens.
With refit (default), each shrunk projection is refitted by least squares to give the layer's unpruned
output on the calibration activations (closed form, no training):
    W' = W G[:, S] (G[S, S] + damp·mean(diag G[S, S]) I)^-1,   G = a^T a over the kept-or-not inputs,
for ffn_out on its kept channels and for attn_out on the kept heads' features (G from the unpruned model).
The model's config records `pruned_heads` and `intermediate_sizes`, so save → load rebuilds the shapes.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformer.encoders.prune_heads import _slice_linear, prune_heads_auto_
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import plain_linears


def block_params(model) -> dict[str, int]:
    """Weights (no biases) of the attention and FFN matmuls, summed over layers."""
    att = sum(m.qkv.weight.numel() + m.attn_out.weight.numel() for m in model.layers)
    ffn = sum(m.ffn_in.weight.numel() + m.ffn_out.weight.numel() for m in model.layers)
    return {"attention": att, "ffn": ffn, "total": att + ffn}


def input_grams(model, tok, texts: list[str], names: tuple[str, ...], batch_size: int = 32) -> dict:
    """Per layer and Linear name ("ffn_out" / "attn_out"): G = x^T x [in, in] (float64 sum) over the real
    (not padding) tokens of the calibration texts, x the Linear's input [N, in]."""
    from leanformer.encoders.embed import length_sorted_batches

    grams = {(i, n): None for i in range(len(model.layers)) for n in names}
    real: list[torch.Tensor] = []  # the current batch's token mask [B*T]

    def hook(key):
        def fn(_mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[real[0]].float()  # [N, in]
            g = (x.T @ x).double()  # fp32 per batch (~4x faster than fp64), summed in fp64
            grams[key] = g if grams[key] is None else grams[key] + g

        return fn

    batches = list(length_sorted_batches(model, tok, texts, batch_size))
    with plain_linears(model), torch.inference_mode():
        handles = [
            getattr(layer, n).register_forward_pre_hook(hook((i, n)))
            for i, layer in enumerate(model.layers)
            for n in names
            if getattr(layer, n).weight.shape[1]  # a layer without heads has no attention input
        ]
        try:
            for _, ids, mask in tqdm(batches, desc="calibration", unit="batch", leave=False):
                real[:] = [mask.reshape(-1).bool()]
                model(ids, mask)
        finally:
            for h in handles:
                h.remove()
    return grams


@torch.no_grad()
def _refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """Least-squares W' [out, |S|] with x_S W'^T ≈ x W^T on the calibration inputs (module docstring)."""
    g = gram.double()
    g_ss = g[kept][:, kept]
    g_ss = g_ss + torch.eye(len(kept), dtype=g.dtype) * damp * torch.diagonal(g_ss).mean().clamp_min(1e-12)
    rhs = weight.double() @ g[:, kept]  # [out, |S|]
    return torch.linalg.solve(g_ss, rhs.T).T.to(weight.dtype)


def _set_weight(lin: nn.Module, weight: torch.Tensor) -> nn.Module:
    """`lin` (plain or packed) given a new weight of the same shape, in place."""
    lin.weight.data.copy_(weight)
    if hasattr(lin, "repack"):  # oneDNN's packed copy must follow the new values
        lin.repack()
    return lin


def prune_ffn_(model, keep: dict[int, torch.Tensor]):
    """Keep only the given FFN channels (layer → channel indices into the current width), in place."""
    sizes = [layer.ffn_in.out_features for layer in model.layers]
    for li, kept in keep.items():
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        layer = model.layers[li]
        if kept.numel() < 1 or int(kept.max()) >= sizes[li] or len(set(kept.tolist())) != len(kept):
            raise LeanformerError(f"layer {li}: FFN channels to keep must be distinct, in [0, {sizes[li]})")
        layer.ffn_in = _slice_linear(layer.ffn_in, rows=kept)
        layer.ffn_out = _slice_linear(layer.ffn_out, cols=kept)
        sizes[li] = len(kept)
    model.args.intermediate_sizes = sizes
    model.config["intermediate_sizes"] = sizes
    return model


def plan_widths(model, fraction: float, head_fraction: float, multiple: int) -> tuple[int, int]:
    """(heads to remove in all, FFN width per layer) so that at least `fraction` of the block weights go."""
    a = model.args
    heads = a.num_hidden_layers * a.num_attention_heads
    remove_heads = round(head_fraction * heads)
    total = block_params(model)["total"]
    head_w = 4 * a.hidden_size * a.head_dim  # q, k, v rows and attn_out columns of one head
    need = fraction * total - remove_heads * head_w  # weights still to remove, from the FFN
    inter = a.intermediate_size
    per_layer = max(0.0, need) / (2 * a.hidden_size * a.num_hidden_layers)  # channels per layer
    width = multiple * int((inter - per_layer) // multiple)  # rounded down: at least the budget goes
    if need <= 0:
        width = inter
    if width < multiple:
        raise LeanformerError(
            f"fraction {fraction} with head_fraction {head_fraction} leaves under {multiple} FFN channels"
        )
    return remove_heads, width


def prune_encoder_(
    model,
    tok,
    calibration_texts: list[str],
    fraction: float = 0.3,
    head_fraction: float | None = None,
    multiple: int = 32,
    method: str = "taylor",
    steps: int = 4,
    refit: bool = True,
    damp: float = 0.01,
    batch_size: int = 32,
) -> dict:
    """Remove `fraction` of the block weights (heads + FFN channels, see the module docstring) in place.

    Returns {"heads_per_layer", "intermediate_sizes", "pruned_heads", "block_params_before"/"after",
    "removed_fraction"}.
    """
    if not 0 <= fraction < 1:
        raise LeanformerError(f"fraction must be in [0, 1), got {fraction}")
    # default: half the budget's share from the heads, the FFN gives the rest. Measured on
    # all-MiniLM-L6-v2 at 30%: heads 15% → STS-B -0.003; heads 30% (the same share) → -0.017
    head_fraction = fraction / 2 if head_fraction is None else head_fraction
    if not 0 <= head_fraction < 1:
        raise LeanformerError(f"head_fraction must be in [0, 1), got {head_fraction}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise LeanformerError(f"multiple must be a whole number >= 1, got {multiple}")
    if not calibration_texts:
        raise LeanformerError("structured pruning needs calibration texts")
    a = model.args
    if a.pruned_heads or a.intermediate_sizes:
        raise LeanformerError("model is already pruned: prune_encoder_ starts from an unpruned encoder")
    before = block_params(model)
    remove_heads, width = plan_widths(model, fraction, head_fraction, multiple)
    if remove_heads:
        grams = input_grams(model, tok, calibration_texts, ("attn_out",), batch_size) if refit else {}
        old = [layer.attn_out.weight.detach().clone() for layer in model.layers]  # [hidden, H·D]
        prune_heads_auto_(model, tok, calibration_texts, remove_heads / (a.num_hidden_layers * a.num_attention_heads), method, steps, batch_size)  # fmt: skip
        for li, layer in enumerate(model.layers):
            gone = a.pruned_heads.get(li, [])
            if refit and gone and layer.heads:
                kept = [h for h in range(a.num_attention_heads) if h not in gone]
                cols = (torch.tensor(kept)[:, None] * a.head_dim + torch.arange(a.head_dim)).reshape(-1)
                _set_weight(layer.attn_out, _refit(old[li], grams[(li, "attn_out")], cols, damp))
    if width < a.intermediate_size:
        grams = input_grams(model, tok, calibration_texts, ("ffn_out",), batch_size)  # after the heads
        keep = {}
        for li, layer in enumerate(model.layers):
            g = grams[(li, "ffn_out")]  # [I, I]
            w = layer.ffn_out.weight.detach()  # [hidden, I]
            score = torch.diagonal(g).clamp_min(0).sqrt().float() * w.norm(dim=0)
            keep[li] = torch.topk(score, width).indices.sort().values
            new_w = _refit(w, g, keep[li], damp) if refit else None
            prune_ffn_(model, {li: keep[li]})
            if new_w is not None:
                _set_weight(model.layers[li].ffn_out, new_w)
    after = block_params(model)
    return {
        "heads_per_layer": a.heads_per_layer,
        "intermediate_sizes": [layer.ffn_in.out_features for layer in model.layers],
        "pruned_heads": {k: list(v) for k, v in sorted(a.pruned_heads.items())},
        "block_params_before": before["total"],
        "block_params_after": after["total"],
        "removed_fraction": 1 - after["total"] / before["total"],
    }
