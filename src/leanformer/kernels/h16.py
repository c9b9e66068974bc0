"""H16Linear: a Linear whose CPU inference matmul runs in fp16 on AVX512-FP16 (kernels/gemm_h16.cpp).

Why: on Intel CPUs with AVX512-FP16 and no AMX (Sapphire Rapids and later as many cloud VMs expose them),
bf16 buys nothing (vdpbf16ps runs on one port: oneDNN's bf16 GEMM measured 0.6x its fp32) and oneDNN's
f16 GEMM accumulates in fp32 at fp32's rate; vfmadd231ph does twice an fp32 FMA's multiply-adds. The
kernel rounds x and w to fp16, sums the products in fp16 along chains of 128 values of k and adds the
chains in fp32: all-MiniLM-L6-v2's embeddings stay within cosine 0.99999 of fp32 (docs/BENCHMARKS.md,
session 28), tighter than bf16 matmuls' 0.99996.

The module keeps its fp32 `weight` (the state_dict, saving, autograd, pruning and every fallback see an
fp32 Linear); the fp16 panels are a non-persistent copy made at construction. A call whose fp16 chains
could overflow (max|x| * max|w| too large) runs the fp32 matmul instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels
from leanformer.kernels.packed import adopt_linear, deepcopy_repacked


def native_f16() -> bool:
    """Whether this CPU runs H16Linear's kernel (AVX512-FP16) and the kernels are built."""
    return kernels.available() and bool(kernels.ext().has_avx512fp16())


class H16Act(NamedTuple):
    """An H16Linear's fp16 output for the next one: data fp16 [rows, features], absmax its max |value|,
    shape the leading dims of the input it came from."""

    data: torch.Tensor
    absmax: float
    shape: tuple[int, ...]


def _rows(t: torch.Tensor | None, features: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, features)


class H16Linear(nn.Linear):
    """nn.Linear (fp32 weight) whose no-grad CPU calls on fp32 inputs run kernels/gemm_h16.cpp."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> H16Linear:
        new = adopt_linear(cls, linear)
        new.repack()
        return new

    def __deepcopy__(self, memo: dict) -> H16Linear:
        new = deepcopy_repacked(self, memo)
        new.repack()
        return new

    def repack(self) -> None:
        w = self.weight.detach()
        self.register_buffer("h16_panels", kernels.ext().pack_h16(w), persistent=False)
        self.w_absmax = float(w.abs().max()) if w.numel() else 0.0

    def runs_kernel(self) -> bool:
        """Whether a call now takes the fp16 kernel: inference, no hook watching, not traced."""
        return not torch.is_grad_enabled() and not kernels.hooked(self) and not kernels.tracing()

    def fused(
        self, x: torch.Tensor | H16Act, gelu: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[residual +] [GELU (erf)](x @ w^T + b) in fp32, x [..., in] fp32 (or another H16Linear's fp16
        output, `to_h16`); fp16 products where the kernel may run."""
        h16 = isinstance(x, H16Act)
        lead = x.shape if h16 else x.shape[:-1]
        rows = x.data if h16 else x.reshape(-1, x.shape[-1])
        if self.runs_kernel() and (h16 or x.dtype == torch.float32):
            y = kernels.ext().linear_h16(
                rows, self.h16_panels, self.out_features, self.w_absmax, self._bias(), gelu,
                _rows(residual, self.out_features), x.absmax if h16 else -1.0,
            )  # fmt: skip
            if y is not None:
                return y.view(*lead, self.out_features)
        if h16:
            x = rows.float().view(*lead, self.in_features)
        y = F.linear(x, self.weight, self.bias)  # autograd, hooks, another dtype, or fp16 could overflow
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y

    def to_h16(self, x: torch.Tensor | H16Act, gelu: bool = False) -> H16Act | torch.Tensor:
        """[GELU](x @ w^T + b) in fp16 for the next H16Linear (no conversion pass there; the GELU in fp16
        arithmetic, kernels/gemm_h16_avx512fp16.cpp gelu32h); the fp32 result where the kernel may not run
        or fp16 cannot hold it. x fp32 [..., in] or another H16Linear's fp16 output."""
        h16 = isinstance(x, H16Act)
        if self.runs_kernel() and (h16 or x.dtype == torch.float32) and self.out_features % 2 == 0:
            out = kernels.ext().linear_h16_to_h16(
                x.data if h16 else x.reshape(-1, x.shape[-1]),
                self.h16_panels,
                self.out_features,
                self.w_absmax,
                self._bias(),
                gelu,
                x.absmax if h16 else -1.0,
            )
            if out is not None and out[1] <= 60000:  # fp16's largest finite value is 65504
                return H16Act(out[0], out[1], x.shape if h16 else tuple(x.shape[:-1]))
        return self.fused(x, gelu)

    def fused_norm(
        self, x: torch.Tensor | H16Act, residual: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, H16Act | None] | None:
        """(norm(residual + x @ w^T + b) fp32 [..., out], its fp16 copy for the next H16Linear) in one
        kernel call: each task's rows are normalized while they are still in cache (post-LayerNorm blocks'
        output projections, models/bert.py); the copy is None where fp16 cannot hold y. None where that
        kernel may not run (then call `fused` and the norm): norm not a plain fp32 LayerNorm over `out`
        features, hooks, autograd, tracing, or an fp16 chain that could overflow."""
        h16 = isinstance(x, H16Act)
        if not (
            self.runs_kernel()
            and type(norm) is nn.LayerNorm
            and not kernels.hooked(norm)
            and tuple(norm.normalized_shape) == (self.out_features,)
            and (norm.weight is None or norm.weight.dtype == torch.float32)
            and (norm.bias is None or norm.bias.dtype == torch.float32)
            and self.out_features % 2 == 0
            and (h16 or x.dtype == torch.float32)
            and residual.dtype == torch.float32
        ):
            return None
        lead = x.shape if h16 else x.shape[:-1]
        out = kernels.ext().linear_h16_norm(
            x.data if h16 else x.reshape(-1, x.shape[-1]), self.h16_panels, self.out_features,
            self.w_absmax, self._bias(), _rows(residual, self.out_features),
            None if norm.weight is None else norm.weight.detach(),
            None if norm.bias is None else norm.bias.detach(), norm.eps, x.absmax if h16 else -1.0,
        )  # fmt: skip
        if out is None:
            return None
        y, y16, amax = out
        y = y.view(*lead, self.out_features)
        if not amax <= 60000:  # the copy cannot stand for y (fp16 overflow, or y holds NaN / inf)
            return y, None
        return y, H16Act(y16, amax, tuple(lead))

    def _bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)


def h16_linears_(module: nn.Module, skip: tuple[str, ...] = ("probe",)) -> nn.Module:
    """Every plain non-empty fp32 CPU nn.Linear of `module` → H16Linear, in place (direct children named
    in `skip` left alone: a trained probe must give the very same scores)."""
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if type(child) is nn.Linear:
            w = child.weight
            if w.numel() and w.dtype == torch.float32 and w.device.type == "cpu":
                setattr(module, name, H16Linear.from_linear(child))
        else:
            h16_linears_(child, skip)
    return module
