"""Structured pruning that shrinks a Llama-family decoder: fewer FFN intermediate channels per layer.

Per layer with down_proj input a [T, I] (a = silu(gate) * up) and W_down [H, I], channel j's importance
is ||a_j||_2 * ||W_down[:, j]||_2 (activation x weight). The kept channels S (a multiple of `multiple`,
so int4 group sizes still divide the new width) keep their gate/up rows and down columns; with refit,
W_down[:, S] is replaced by the least-squares fit of the dense layer's output on the kept channels:
    W' = W G[:, S] (G[S, S] + damp)^-1,   G = a^T a   ([I, I], from calibrate.collect_stats)
Layers are walked in order (calibrate.iter_scopes), so each layer is scored on the outputs of the
already-pruned layers before it. The model's config records the per-layer widths
("intermediate_sizes"), which models/llama.py reads, so save -> load rebuilds the smaller shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress.calibrate import (
    BlockHooks,
    Calibration,
    collect_stats,
    iter_scopes,
    lean_batch_size,
    model_device,
    run_model,
    to_batches,
)
from leanformer.compress.config import PruneFFN, PruneLayers
from leanformer.errors import LeanformerError
from leanformer.kernels.packed import PackedLinear


def ffn_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The selected down_proj names whose MLP has the fused gate_up_proj layout of models/llama.py."""
    out = []
    for n in names:
        if not n.endswith("mlp.down_proj"):
            continue
        mlp = model.get_submodule(n.rsplit(".", 1)[0])
        if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear) and hasattr(mlp, "inter"):
            out.append(n)
    if not out:
        raise LeanformerError(
            "PruneFFN: no float Llama-family MLP (gate_up_proj + down_proj) among the targets; "
            "prune before quantizing, on a model loaded by leanformer"
        )
    return out


def kept_width(inter: int, sparsity: float, multiple: int) -> int:
    """Channels kept: (1 - sparsity) * inter rounded to a multiple of `multiple`, at least one multiple."""
    if inter <= multiple:
        return inter
    return min(inter, max(multiple, multiple * round(inter * (1 - sparsity) / multiple)))


def rebuilt_like(old: nn.Module, plain: nn.Linear) -> nn.Linear:
    """A new plain Linear as the same fast class as the one it replaces (kernels/: FastLinear's GEMV at
    decode, PackedLinear's oneDNN copy at prefill), so a shrunk model keeps the speed of the fast path."""
    if type(old) is nn.Linear or not callable(getattr(type(old), "from_linear", None)):
        return plain
    src = plain
    if getattr(old, "packed_weight", None) is not None and not isinstance(old, PackedLinear):
        src = PackedLinear.from_linear(plain)  # FastLinear.from_linear keeps a source's packed copy
    return type(old).from_linear(src)


@torch.no_grad()
def shrink_mlp(mlp: nn.Module, gram: torch.Tensor, keep: int, refit: bool, damp: float) -> None:
    """Keep the `keep` most important channels of one MLP in place (new, smaller Linears)."""
    gu, down = mlp.gate_up_proj, mlp.down_proj
    inter, w_down = mlp.inter, down.weight.float()  # [H, I]
    score = torch.diagonal(gram).clamp_min(0).sqrt() * w_down.norm(dim=0)
    kept = torch.topk(score, keep).indices.sort().values  # [keep], original order
    new_down = w_down[:, kept]
    if refit:  # least squares on the calibration activations: W G[:, S] (G[S, S] + λ I)^-1
        g_ss = gram[kept][:, kept]
        g_ss = g_ss + torch.eye(keep) * damp * torch.diagonal(g_ss).mean().clamp_min(1e-8)
        rhs = w_down @ gram[:, kept]  # [H, keep]
        new_down = torch.linalg.solve(g_ss, rhs.T).T
    rows = torch.cat([kept, kept + inter])  # gate rows then up rows, as forward splits them
    new_gu = nn.Linear(gu.in_features, 2 * keep, bias=gu.bias is not None, device=gu.weight.device)
    new_gu = new_gu.to(gu.weight.dtype)
    new_gu.weight.copy_(gu.weight[rows])
    if gu.bias is not None:
        new_gu.bias.copy_(gu.bias[rows])
    new_dn = nn.Linear(keep, down.out_features, bias=down.bias is not None, device=down.weight.device)
    new_dn = new_dn.to(down.weight.dtype)
    new_dn.weight.copy_(new_down.to(down.weight.dtype))
    if down.bias is not None:
        new_dn.bias.copy_(down.bias)
    mlp.gate_up_proj, mlp.down_proj = rebuilt_like(gu, new_gu), rebuilt_like(down, new_dn)
    mlp.inter = keep


def prune_ffn(
    model: nn.Module,
    cfg: PruneFFN,
    names: list[str],
    calibration: Calibration,
    progress: bool = True,
    hooks: BlockHooks | None = None,
) -> None:
    """Shrink the MLPs owning the down_proj `names`, then record every layer's width in the config;
    `hooks` stream the blocks in and out (compress/stream.py)."""
    targets = ffn_targets(model, names)
    batch = lean_batch_size(cfg.batch_size, calibration)  # activations, not weights, set the peak
    for scope in iter_scopes(model, targets, calibration, batch, progress, "PruneFFN", hooks):
        for st in collect_stats(model, scope):
            for name in st.names:
                mlp = model.get_submodule(name.rsplit(".", 1)[0])
                shrink_mlp(
                    mlp, st.gram, kept_width(mlp.inter, cfg.sparsity, cfg.multiple), cfg.refit, cfg.damp
                )
            del st.gram
    record_widths(model)


def record_widths(model: nn.Module) -> None:
    """Per-layer FFN widths into model.args / model.config, which rebuild the shapes on load."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return
    sizes = [int(layer.mlp.inter) for layer in layers]
    if hasattr(model, "args") and hasattr(model.args, "intermediate_sizes"):
        model.args.intermediate_sizes = sizes
    if isinstance(getattr(model, "config", None), dict):
        model.config["intermediate_sizes"] = sizes
    record_heads(model)


def record_heads(model: nn.Module) -> None:
    """Per-layer query-head counts and the KV head count (compress/prune_heads.py) into model.args /
    model.config, when they differ from what the config says: equal counts in every layer stay a plain
    HF config (num_attention_heads, num_key_value_heads, head_dim); unequal ones add
    num_attention_heads_per_layer, which models/llama.py reads."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    args = getattr(model, "args", None)
    if layers is None or not hasattr(args, "num_attention_heads_per_layer"):
        return
    heads = [int(layer.self_attn.n_heads) for layer in layers]
    kv = int(layers[0].self_attn.n_kv_heads)
    per_layer = None if len(set(heads)) == 1 else heads
    now = (args.num_attention_heads, args.num_key_value_heads, args.num_attention_heads_per_layer)
    if now == (max(heads), kv, per_layer):
        return
    args.num_attention_heads = max(heads)
    args.num_key_value_heads, args.num_attention_heads_per_layer = kv, per_layer
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        cfg.update(num_attention_heads=max(heads), num_key_value_heads=kv, head_dim=args.head_dim)
        if per_layer is None:
            cfg.pop("num_attention_heads_per_layer", None)
        else:
            cfg["num_attention_heads_per_layer"] = per_layer


@torch.no_grad()
def block_influence(
    model: nn.Module,
    calibration: Calibration,
    batch_size: int,
    hooks: BlockHooks | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """[n_layers] 1 - mean over calibration tokens of cos(layer input, layer output) (ShortGPT's BI):
    a layer that barely turns the residual stream is the cheapest to remove. One plain forward per
    batch with a hook on every layer; with `hooks` (streaming, compress/stream.py) the sequential walk
    calls each layer on the same inputs instead, one layer at a time."""
    layers = _decoder_layers(model)
    total = torch.zeros(len(layers))
    count = [0]

    def hook(i: int):
        def fn(_mod, args, out):
            x, y = args[0].float(), (out[0] if isinstance(out, (tuple, list)) else out).float()
            total[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum().item()
            if i == 0:
                count[0] += x.shape[0] * x.shape[1]  # tokens [B, T]

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        if hooks is not None:
            names = [f"model.layers.{i}" for i in range(len(layers))]
            for _scope in iter_scopes(model, names, calibration, batch_size, progress, "PruneLayers", hooks):
                pass  # the walk itself runs every layer once per batch
        else:
            for ids in to_batches(calibration, batch_size, model_device(model)):
                run_model(model, ids)
    finally:
        for h in handles:
            h.remove()
    return total / max(count[0], 1)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(la, "self_attn") for la in layers):
        raise LeanformerError("PruneLayers works on leanformer Llama-family decoders (model.model.layers)")
    return layers


def check_prunable_layers(model: nn.Module, cfg: PruneLayers) -> None:
    n = len(_decoder_layers(model))
    if cfg.n_layers >= n:
        raise LeanformerError(f"PruneLayers: n_layers {cfg.n_layers} must be below the model's {n} layers")


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    cfg: PruneLayers,
    calibration: Calibration,
    hooks: BlockHooks | None = None,
    progress: bool = False,
) -> list[int]:
    """Remove the cfg.n_layers lowest-influence layers in place; returns their original indices.
    `hooks`: scored by the streaming walk (compress/stream.py), which then renumbers what it holds."""
    bi = block_influence(model, calibration, cfg.batch_size, hooks, progress)
    drop = sorted(torch.topk(bi, cfg.n_layers, largest=False).indices.tolist())
    drop_layers(model, drop)
    return drop


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    """Remove the decoder layers at indices `drop` in place; the config follows."""
    layers = _decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    for i, layer in enumerate(kept):  # KV cache slots are indexed by position in the stack
        layer.self_attn.layer_idx = i
    model.model.layers = nn.ModuleList(kept)
    if hasattr(model, "args"):
        model.args.num_hidden_layers = len(kept)
    if isinstance(getattr(model, "config", None), dict):
        model.config["num_hidden_layers"] = len(kept)
    if getattr(getattr(model, "args", None), "intermediate_sizes", None):
        record_widths(model)  # the per-layer widths of the layers that remain
    record_heads(model)  # and head counts (a per-layer list follows the layers that remain)
