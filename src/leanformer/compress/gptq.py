"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022), producing the same Int4Linear / Int8Linear modules as round-to-nearest.

Per Linear with weight W [N, K] and calibration inputs X [T, K], minimize ||X W^T - X Q^T||^2 by
quantizing one input column at a time and spreading its error over the not-yet-quantized columns,
weighted by the inverse Hessian H^-1 (H = 2 X^T X / T). Lazy batch updates apply the accumulated error
of a block of columns to the rest with one matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress import kernels as K
from leanformer.compress.calibrate import (
    BlockHooks,
    Calibration,
    collect_stats,
    iter_scopes,
    lean_batch_size,
    trim_heap,
)
from leanformer.compress.quant import GPTQ, Int4Linear, Int8Linear, set_module
from leanformer.errors import LeanformerError


def _inverse_hessian_chol(h: torch.Tensor | list[torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening (more damping if H is not positive definite).

    h: H, left as it is; or [H] (a list holding the only other reference), which is dampened in place
    and freed as soon as it is factored. At most two [K, K] matrices then live at once (a down_proj
    with K = 4864: 95 MB each; eye() + the dampened sum + the factors used to hold six)."""
    owned = isinstance(h, list)
    h = h.pop() if isinstance(h, list) else h
    diag = torch.diagonal(h).clone()
    mean_diag = diag.mean().clamp_min(1e-8)
    for factor in (1.0, 10.0, 100.0, 1000.0):
        hd = h if owned else h.clone()
        hd.diagonal().copy_(diag).add_(max(damp, 1e-6) * factor * mean_diag)  # = h + eye * d exactly
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            if owned:
                del h
            hinv = torch.cholesky_inverse(chol)
            del chol
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return chol_inv
            if owned:  # H itself is gone (the memory it saves); never seen: H^-1 of a factored H
                raise LeanformerError(
                    f"GPTQ: the inverse Hessian lost positive definiteness; raise damp above {damp}"
                )
    raise LeanformerError(
        "GPTQ: Hessian is not positive definite even after dampening; check calibration data"
    )


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor | list[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K], h [K, K] (or [h]: handed over, overwritten and freed here) -> (codes, scales, zeros).
    bits=4: codes uint8 [N, K] in [0, 15], scales/zeros [N, G] (w ≈ (q - 8) * s + z per group).
    bits=8: codes int8 [N, K], scales [N] (w ≈ q * s), zeros None.
    With act_order, columns go in order of decreasing H diagonal but group parameters are computed up
    front on the original column groups ("static groups"), so the result fits the group-wise kernels."""
    w = w.detach().float().clone()
    n, k = w.shape
    if isinstance(h, list):  # handed over: the list held the caller's only reference
        h = h.pop().float()
    else:
        h = h.float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0

    if bits == 8:
        q8, s8 = K.int8_symmetric(w)  # per-channel scale fixed from the full rows
        scales, zeros = s8, None
    else:
        g = group_size
        scales = torch.zeros(n, K.n_groups(k, g), device=w.device)
        zeros = torch.zeros_like(scales)
        if act_order:
            scales, zeros = K.int4_params(w, g)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    box = [h]  # this function's copy: freed inside once factored
    del h
    hinv = _inverse_hessian_chol(box, damp)

    codes = torch.zeros(n, k, dtype=torch.int8 if bits == 8 else torch.uint8, device=w.device)
    # Blocks are whole groups so a group's lazily computed parameters see its updated columns.
    bs = max(block_size // group_size, 1) * group_size if bits == 4 else block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()  # [N, B] columns being quantized, updated in place
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wc, d = w1[:, i], hinv1[i, i]
            if bits == 8:
                q = torch.round(wc / scales).clamp_(-128, 127)
                deq = q * scales
            else:
                if perm is None and col % group_size == 0:  # entering a group: RTN params on updated W
                    s, z = K.int4_params(w1[:, i : i + group_size], group_size)
                    scales[:, col // group_size], zeros[:, col // group_size] = s[:, 0], z[:, 0]
                grp = (int(perm[col]) if perm is not None else col) // group_size
                s, z = scales[:, grp], zeros[:, grp]
                q = torch.round((wc - z) / s + 8).clamp_(0, 15)
                deq = (q - 8) * s + z
            codes[:, col] = q.to(codes.dtype)
            e = (wc - deq) / d  # [N]
            w1[:, i:].sub_(e[:, None] * hinv1[i, i:][None, :])
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])  # lazy update of all later columns

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    cfg: GPTQ,
    names: list[str],
    calibration: Calibration,
    progress: bool = True,
    hooks: BlockHooks | None = None,
) -> nn.Module:
    """Quantize the Linears `names` of `model` in place, block by block (sequentially); `hooks` stream
    the blocks' weights in and out (compress/stream.py)."""
    batch = lean_batch_size(cfg.batch_size, calibration)  # activations, not weights, set the peak
    for scope in iter_scopes(model, names, calibration, batch, progress, "GPTQ", hooks):
        for st in collect_stats(model, scope):
            hess = [st.gram.mul_(2.0 / max(st.count, 1))]  # st.hessian, in place: no second [K, K]
            del st.gram
            for i, name in enumerate(st.names):
                lin = model.get_submodule(name)
                last = i == len(st.names) - 1  # the last user takes the Hessian over and frees it
                codes, scales, zeros = gptq_quantize_weight(
                    lin.weight, hess if last else hess[0], cfg.bits, cfg.group_size, cfg.damp,
                    cfg.act_order, cfg.block_size,
                )  # fmt: skip
                if cfg.bits == 8:
                    new = Int8Linear.from_linear(lin, codes, scales)
                else:
                    new = Int4Linear.from_linear(lin, cfg.group_size, codes, scales, zeros)
                set_module(model, name, new)
                del lin, new, codes, scales, zeros
                trim_heap()  # this Linear's float weight and GPTQ temporaries: off the resident set
    return model
