"""Unstructured and N:M pruning (Magnitude, Wanda, SparseGPT): zeros written into nn.Linear weights.

The Linears stay dense float modules, so a pruned model saves, loads and quantizes like any other; the
zeros cost the same bytes and the same time as the values they replaced (dense kernels). Calibrated
methods walk the model block by block like GPTQ (calibrate.iter_scopes): each block is pruned on the
hidden states of the already-pruned blocks before it.

Masks are chosen per output row (unstructured: the row's `sparsity` fraction of smallest scores) or per
group of M consecutive inputs of a row (N:M: the M - N smallest), as Wanda and SparseGPT do.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformer.compress.calibrate import BlockHooks, Calibration, collect_stats, iter_scopes, lean_batch_size
from leanformer.compress.config import Magnitude, PruneConfig, SparseGPT, Wanda, matches, parse_pattern
from leanformer.compress.gptq import _inverse_hessian_chol
from leanformer.errors import LeanformerError


def layer_sparsities(names: list[str], config: PruneConfig) -> dict[str, float]:
    """Linear name -> sparsity: one value for all, or the first matching pattern of a dict (names that
    match no pattern stay dense); zero-sparsity entries are dropped."""
    if isinstance(config.sparsity, dict):
        out = {}
        for n in names:
            hit = next((v for p, v in config.sparsity.items() if matches(n, [p])), None)
            if hit:
                out[n] = float(hit)
    else:
        out = {n: float(config.sparsity) for n in names} if config.sparsity else {}
    if not out:
        raise LeanformerError(f"{type(config).__name__}: no targeted Linear gets a sparsity above 0")
    return out


def check_prunable(model: nn.Module, sparsities: dict[str, float], cfg: PruneConfig) -> None:
    """Shape checks before any calibration: N:M needs in_features divisible by M."""
    nm = parse_pattern(cfg.pattern, type(cfg).__name__)
    if nm is None:
        return
    for name in sparsities:
        k = model.get_submodule(name).in_features
        if k % nm[1]:
            raise LeanformerError(
                f"{type(cfg).__name__}: pattern {cfg.pattern} needs in_features divisible by {nm[1]}, "
                f"{name} has {k}; ignore it or use 'unstructured'"
            )


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """score [N, K] -> bool mask [N, K], True where the weight is pruned (the lowest scores)."""
    n, k = score.shape
    mask = torch.zeros(n, k, dtype=torch.bool, device=score.device)
    if nm is None:
        drop = int(k * sparsity)
        if drop:
            mask.scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, True)
        return mask
    keep, m = nm
    groups = score.reshape(n, k // m, m)
    idx = torch.topk(groups, m - keep, dim=2, largest=False).indices
    return mask.view(n, k // m, m).scatter_(2, idx, True).view(n, k)


@torch.no_grad()
def sparsegpt_prune_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """w [N, K], h [K, K] -> pruned weight [N, K] (float32). The GPTQ column loop with "quantize" =
    "zero if masked": each column's error is spread over the later columns through H^-1. Unstructured
    masks are chosen per block of columns (adaptive mask selection, as in the paper); N:M per group."""
    w = w.detach().float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_hessian_chol(h, damp)  # upper Cholesky factor of H^-1
    bs = block_size if nm is None else max(block_size // nm[1], 1) * nm[1]  # whole N:M groups per block
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        # unstructured: each row's `sparsity` fraction of the block's lowest w^2 / [H^-1]_jj^2
        mask1 = (
            prune_mask(w1**2 / d**2, sparsity, None) if nm is None else torch.zeros_like(w1, dtype=torch.bool)
        )
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # the group's mask on the error-updated weights
                mask1[:, i : i + nm[1]] = prune_mask(
                    w1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]] ** 2, 0.0, nm
                )
            wc = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(wc), wc)
            e = (wc - q) / hinv1[i, i]  # [N]
            w1[:, i:].sub_(e[:, None] * hinv1[i, i:][None, :])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    return w


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    """Write the pruned weight and refresh a fast Linear's oneDNN copy (kernels/: PackedLinear,
    FastLinear keep one for prefill-sized inputs), or calibration and prefill would still see W."""
    lin.weight.data.copy_(w.to(lin.weight.dtype))
    if callable(getattr(lin, "repack", None)):
        lin.repack()


@torch.no_grad()
def prune_linears(
    model: nn.Module,
    cfg: PruneConfig,
    sparsities: dict[str, float],
    calibration: Calibration | None,
    progress: bool = True,
    hooks: BlockHooks | None = None,
) -> None:
    """Prune each Linear name -> its sparsity in place (names already selected and shape-checked);
    `hooks` stream the blocks' weights in and out (compress/stream.py)."""
    nm = parse_pattern(cfg.pattern, type(cfg).__name__)
    if isinstance(cfg, Magnitude):
        for name in tqdm(list(sparsities), desc="Magnitude", unit="linear", disable=not progress):
            lin = model.get_submodule(name)
            _set_weight(
                lin, lin.weight.masked_fill(prune_mask(lin.weight.abs().float(), sparsities[name], nm), 0)
            )
        return
    if not isinstance(cfg, (Wanda, SparseGPT)):
        raise LeanformerError(f"cannot prune with {type(cfg).__name__}")
    if calibration is None:
        raise LeanformerError(f"{type(cfg).__name__} needs calibration token ids [n_samples, seq_len]")
    desc = type(cfg).__name__
    batch = lean_batch_size(cfg.batch_size, calibration)  # activations, not weights, set the peak
    scopes = iter_scopes(model, list(sparsities), calibration, batch, progress, desc, hooks)
    for scope in scopes:
        for st in collect_stats(model, scope):
            for name in st.names:
                lin = model.get_submodule(name)
                w = lin.weight.float()
                if isinstance(cfg, Wanda):  # |W_ij| * ||X_j||_2, ||X_j||^2 = diag of the Gram matrix
                    score = w.abs() * torch.diagonal(st.gram).sqrt()[None, :]
                    _set_weight(lin, lin.weight.masked_fill(prune_mask(score, sparsities[name], nm), 0))
                else:
                    w = sparsegpt_prune_weight(w, st.hessian, sparsities[name], nm, cfg.damp, cfg.block_size)
                    _set_weight(lin, w)
            del st.gram
