"""Activation-aware low-rank factorisation of Linears (whitened SVD, Wang et al. "SVD-LLM", 2024).

For W [N, K] and calibration inputs X [T, K], the output error of a replacement M is
||X (W - M)^T||_F = ||(W - M) S||_F with G = X^T X = S S^T (S lower Cholesky). So the best rank-r M is
the truncated SVD of the whitened W S = U Σ V^T, mapped back: M = (U_r Σ_r) (V_r^T S^-1) = up @ down.
Plain SVD (S = I) would spend the rank on directions the inputs never excite.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from leanformer.compress.calibrate import BlockHooks, Calibration, collect_stats, iter_scopes, lean_batch_size
from leanformer.compress.config import LowRank
from leanformer.compress.qbase import set_module
from leanformer.compress.structured import rebuilt_like
from leanformer.errors import LeanformerError


class LowRankLinear(nn.Module):
    """x [.., K] -> up(down(x)) [.., N]: down [r, K] (no bias), up [N, r] (+ the original bias). Its two
    children are plain nn.Linear, so a later quantization stage quantizes them."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def lowrank_rank(n: int, k: int, cfg: LowRank) -> int:
    """Rank keeping `ratio` of the n*k parameters, rounded down to a multiple (0: not worth it)."""
    r = int(cfg.ratio * n * k / (n + k))
    return r // cfg.multiple * cfg.multiple


def ranks(model: nn.Module, names: list[str], cfg: LowRank) -> dict[str, int]:
    """Name -> rank for each targeted Linear (checked before any calibration)."""
    out = {}
    for n in names:
        lin = model.get_submodule(n)
        out[n] = lowrank_rank(lin.out_features, lin.in_features, cfg)
    small = [n for n, r in out.items() if r == 0]
    if small:
        raise LeanformerError(
            f"LowRank: ratio {cfg.ratio} leaves rank 0 (below multiple {cfg.multiple}) for {small[0]}; "
            "raise ratio, lower multiple or ignore it"
        )
    return out


def empty_lowrank(lin: nn.Linear, rank: int) -> LowRankLinear:
    w = lin.weight
    return LowRankLinear(lin.in_features, lin.out_features, rank, lin.bias is not None, w.device, w.dtype)


@torch.no_grad()
def factorize(
    w: torch.Tensor, gram: torch.Tensor | None, rank: int, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K], gram [K, K] -> (up [N, r], down [r, K]) minimizing ||X (w - up @ down)^T||; gram None:
    plain truncated SVD (minimizes ||w - up @ down||, blind to the inputs)."""
    w = w.float()
    if gram is None:
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * sigma[:rank], vh[:rank]
    mean_diag = torch.diagonal(gram).mean().clamp_min(1e-8)
    for factor in (1.0, 10.0, 100.0, 1000.0):  # more damping if G is (numerically) singular
        damped = gram.clone()  # G + λI without a [K, K] identity (two fewer K² temporaries: 94 MB each
        damped.diagonal().add_(max(damp, 1e-6) * factor * mean_diag)  # at K = 4864); the same bits
        s, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            break
    else:
        raise LeanformerError("LowRank: calibration Gram matrix is not positive definite; check calibration")
    u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)  # [N, m], [m], [m, K]
    up = u[:, :rank] * sigma[:rank]
    # V_r^T S^-1: solve S^T Z^T = V_r  (S lower triangular)
    down = torch.linalg.solve_triangular(s.T, vh[:rank].T, upper=True).T
    return up, down


def _median_call_s(fn, x: torch.Tensor, calls: int = 50, repeats: int = 7) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


@torch.no_grad()
def faster_when_factorised(lin: nn.Linear, rank: int, margin: float = 0.95) -> tuple[bool, float]:
    """Times y = x W^T against y = (x D^T) U^T for one decode row x [1, K] (random factors: speed does
    not depend on the values); factorised wins only if below `margin` × dense. Returns (wins, speed-up)."""
    lr = empty_lowrank(lin, rank)
    lr.down, lr.up = rebuilt_like(lin, lr.down), rebuilt_like(lin, lr.up)  # the factors' real class (GEMV)
    x = torch.randn(1, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
    dense, factored = _median_call_s(lin, x), _median_call_s(lr, x)
    return factored < margin * dense, dense / factored


def speed_gate(model: nn.Module, cfg: LowRank, rank_of: dict[str, int]) -> dict[str, float]:
    """keep="faster": drop from `rank_of` every Linear whose factorised form is not faster at batch 1,
    adding its name to cfg.ignore (the saved recipe then rebuilds the same modules on reload). One timing
    per (shape, rank, dtype): layers of one model repeat a few shapes. Returns name -> measured speed-up."""
    by_shape: dict[tuple, tuple[bool, float]] = {}
    speedup = {}
    for name in list(rank_of):
        lin = model.get_submodule(name)
        key = (lin.out_features, lin.in_features, rank_of[name], lin.weight.dtype, lin.bias is not None)
        if key not in by_shape:
            by_shape[key] = faster_when_factorised(lin, rank_of[name])
        wins, speedup[name] = by_shape[key]
        if not wins:
            del rank_of[name]
    if not rank_of:
        best = max(speedup.values())
        raise LeanformerError(
            f"LowRank: no targeted Linear runs faster factorised at ratio {cfg.ratio} on this CPU "
            f"(best {best:.2f}x dense at batch 1); lower ratio, or keep='smaller' to factorise for size"
        )
    cfg.ignore.extend(n for n in speedup if n not in rank_of)
    return speedup


@torch.no_grad()
def lowrank_(
    model: nn.Module,
    cfg: LowRank,
    rank_of: dict[str, int],
    calibration: Calibration,
    progress: bool = True,
    hooks: BlockHooks | None = None,
    gated: bool = False,
) -> dict[str, float]:
    """Replace each Linear in `rank_of` by its calibrated factorisation, block by block (only those that
    measure faster when cfg.keep == "faster"). Returns name -> measured batch-1 speed-up (keep="faster").
    `hooks` stream the blocks in and out (compress/stream.py); `gated`: `rank_of` already passed the
    speed gate (streaming times it before any weight is read)."""
    speedup = speed_gate(model, cfg, rank_of) if cfg.keep == "faster" and not gated else {}
    batch = lean_batch_size(cfg.batch_size, calibration)  # activations, not weights, set the peak
    scopes = iter_scopes(model, list(rank_of), calibration, batch, progress, "LowRank", hooks)
    for scope in scopes:
        for st in collect_stats(model, scope):
            for name in st.names:
                if name not in rank_of:
                    continue
                lin = model.get_submodule(name)
                gram = st.gram if cfg.whiten else None
                up, down = factorize(lin.weight, gram, rank_of[name], cfg.damp)
                new = empty_lowrank(lin, rank_of[name])
                new.up.weight.copy_(up)
                new.down.weight.copy_(down)
                if lin.bias is not None:
                    new.up.bias.copy_(lin.bias)
                new.down, new.up = rebuilt_like(lin, new.down), rebuilt_like(lin, new.up)
                set_module(model, name, new)
            del st.gram
    return speedup
