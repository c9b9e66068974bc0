"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
2023), producing the same Int4Linear / Int8Linear modules as round-to-nearest.

Weights that meet large activations matter most. Scaling input channel j of W by s_j > 1 (and the
input by 1/s_j) shrinks that channel's relative rounding error. s = mean|x|^alpha with alpha chosen on a
grid to minimize the layer's output error. The output error of a weight error D [N, K] over calibration
inputs X is ||X D^T||^2 = sum((D @ G) * D) with G = X^T X / T, so every candidate is scored against
all calibration tokens at the cost of one [N, K] x [K, K] product, without storing activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.compress import kernels as K
from leanformer.compress.calibrate import (
    BlockHooks,
    Calibration,
    InputStats,
    Scope,
    collect_stats,
    iter_scopes,
    lean_batch_size,
)
from leanformer.compress.gptq import gptq_quantize_weight
from leanformer.compress.quant import AWQ, Int4Linear, Int8Linear, set_module

CLIP_GRID = torch.linspace(1.0, 0.5, 11).tolist()  # shrink factors of each group's [min, max] range


def _fake_quant(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    if bits == 8:
        q, s = K.int8_symmetric(w)
        return q.float() * s[:, None]
    return K.int4_fake_quant(w, group_size, clip)


def _output_error(d: torch.Tensor, g: torch.Tensor) -> float:
    """||X d^T||^2 / T for weight error d [N, K] and G = X^T X / T [K, K]."""
    return float(((d @ g) * d).sum())


def search_scale(w: torch.Tensor, g: torch.Tensor, mean_abs: torch.Tensor, cfg: AWQ) -> torch.Tensor | None:
    """Best per-input-channel scale s [K] for weight w [N, K] (None when alpha = 0, i.e. plain RTN, wins)."""
    best_err, best_s = _output_error(w - _fake_quant(w, cfg.bits, cfg.group_size), g), None
    base = mean_abs.float().clamp_min(1e-4)
    for i in range(1, cfg.n_grid + 1):
        s = base.pow(i / cfg.n_grid)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales so neither end under/overflows
        err = _output_error(w - _fake_quant(w * s, cfg.bits, cfg.group_size) / s, g)
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def search_clip(w: torch.Tensor, g: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per (row, group) range shrink factor [N, G] minimizing that group's output error for w [N, K]."""
    n, k = w.shape
    ng = K.n_groups(k, group_size)
    pad = ng * group_size - k
    gp = F.pad(g, (0, pad, 0, pad))
    # Diagonal blocks of G, one per group: [G, g, g]; groups are scored independently (as AWQ does).
    blocks = torch.stack(
        [gp[i * group_size : (i + 1) * group_size, i * group_size : (i + 1) * group_size] for i in range(ng)]
    )
    best_err = torch.full((n, ng), float("inf"), device=w.device)
    best = torch.ones(n, ng, device=w.device)
    for c in CLIP_GRID:
        clip = torch.full((n, ng), c, device=w.device)
        d = F.pad(w - K.int4_fake_quant(w, group_size, clip), (0, pad)).reshape(n, ng, group_size)
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def _refresh(lin: nn.Module) -> None:
    """Linears that keep a derived copy of their weight (models.layers.PackedLinear) must rebuild it."""
    if callable(getattr(lin, "repack", None)):
        lin.repack()


def _try_fold(norm: nn.Module, s: torch.Tensor, scope: Scope, ref: torch.Tensor) -> bool:
    """Divide the producing norm's affine weight (and bias) by s, keep it only if the block output is
    unchanged: a norm whose output also feeds a residual (post-norm BERT) must not be folded into."""
    old_w = norm.weight.data.clone()
    old_b = norm.bias.data.clone() if getattr(norm, "bias", None) is not None else None
    norm.weight.data.div_(s.to(old_w.dtype))
    if old_b is not None:
        norm.bias.data.div_(s.to(old_b.dtype))
    out = scope.run_first()
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    if float((out - ref).float().norm() / ref.float().norm().clamp_min(1e-12)) <= tol:
        return True
    norm.weight.data.copy_(old_w)
    if old_b is not None:
        norm.bias.data.copy_(old_b)
    return False


def _quantize_group(model: nn.Module, st: InputStats, cfg: AWQ, s: torch.Tensor | None, folded: bool) -> None:
    g = st.gram / max(st.count, 1)
    if s is not None:
        g = g / (s[:, None] * s[None, :])  # inputs of the scaled weights are x / s
    for name in st.names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        if s is not None and not folded:  # folded weights were already multiplied by s
            w = w * s
        if cfg.gptq:  # AWQ's scales, then GPTQ's error feedback on the scaled problem (H of x / s)
            codes, scales, zeros = gptq_quantize_weight(
                w, 2 * g, cfg.bits, cfg.group_size, cfg.damp, act_order=True
            )
            new = (
                Int8Linear.from_linear(lin, codes, scales)
                if cfg.bits == 8
                else Int4Linear.from_linear(lin, cfg.group_size, codes, scales, zeros)
            )
        elif cfg.bits == 8:
            new = Int8Linear.from_linear(lin, *K.int8_symmetric(w))
        else:
            clip = search_clip(w, g, cfg.group_size) if cfg.clip else None
            scales, zeros = K.int4_params(w, cfg.group_size, clip)
            codes = K.int4_codes(w, scales, zeros, cfg.group_size)
            new = Int4Linear.from_linear(lin, cfg.group_size, codes, scales, zeros)
        if s is not None and not folded:
            new.set_input_scale(1.0 / s)
        set_module(model, name, new)


@torch.no_grad()
def awq_quantize(
    model: nn.Module,
    cfg: AWQ,
    names: list[str],
    calibration: Calibration,
    progress: bool = True,
    hooks: BlockHooks | None = None,
) -> nn.Module:
    """Quantize the Linears `names` of `model` in place, block by block (sequentially); `hooks` stream
    the blocks' weights in and out (compress/stream.py)."""
    batch = lean_batch_size(cfg.batch_size, calibration)  # activations, not weights, set the peak
    for scope in iter_scopes(model, names, calibration, batch, progress, "AWQ", hooks):
        stats = collect_stats(model, scope, producers=True)
        ref = scope.run_first()  # float output before any transform, to verify folds
        plans = []
        for st in stats:
            lins = [model.get_submodule(n) for n in st.names]
            w = torch.cat([lin.weight.detach().float() for lin in lins])  # [sum N, K], shared input
            s = search_scale(w, st.gram / max(st.count, 1), st.mean_abs, cfg)
            folded = False
            if s is not None and st.producer is not None:
                old = [lin.weight.data.clone() for lin in lins]
                for lin in lins:  # exact float transform: W' = W * s while the norm emits x / s
                    lin.weight.data.mul_(s.to(lin.weight.dtype))
                    _refresh(lin)
                folded = _try_fold(st.producer, s, scope, ref)
                if not folded:
                    for lin, o in zip(lins, old):
                        lin.weight.data.copy_(o)
                        _refresh(lin)
            plans.append((st, s, folded))
        for st, s, folded in plans:
            _quantize_group(model, st, cfg, s, folded)
            del st.gram
    return model
