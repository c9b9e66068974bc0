"""The quantized Linear modules that configs swap in (torchao's `quantize_` shape); the configs are in
config.py and re-exported here, the weight-only modules live in int8.py / int4.py (paths: qbase.py).

State dicts hold a portable form (int8 rows, int4 nibbles + scales/zeros), never a machine-specific
packed layout, so a saved model reloads on another CPU or on a GPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from leanformer import kernels as lk
from leanformer.compress import kernels as K
from leanformer.compress.config import (  # noqa: F401  (configs live beside their modules for `from .quant import ...`)
    AWQ,
    CONFIG_TYPES,
    DEFAULT_IGNORE,
    GPTQ,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    KVCache,
    QuantConfig,
)
from leanformer.compress.int4 import Int4Linear  # noqa: F401
from leanformer.compress.int8 import Int8Linear  # noqa: F401
from leanformer.compress.qbase import QuantLinear, set_module  # noqa: F401

_QLinear = QuantLinear  # the base's former name


class Int8DynamicLinear(QuantLinear):
    """W8A8: int8 weights per channel x int8 activations per token (scales computed each call)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        min_tokens: int = 16,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.min_tokens = min_tokens
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self._onednn: torch.Tensor | None = None  # oneDNN-packed weight, built on first large call
        self._zp: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, min_tokens: int = 16) -> Int8DynamicLinear:
        w = linear.weight.detach()
        m = cls(
            linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype, min_tokens
        )
        qmax = 127 if (w.device.type != "cpu" or K.cpu_has_vnni()) else 63
        q, scales = K.int8_symmetric(w, qmax=qmax)
        m.weight_int8.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    EXACT = ("scales", "input_scale")

    def _drop_caches(self) -> None:
        self._onednn = None

    def __getstate__(self) -> dict:
        # The oneDNN-packed weight is an opaque tensor: copy.deepcopy/pickle cannot copy it; rebuild later.
        return {**super().__getstate__(), "_onednn": None}

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lk.ext().linear_q8(x, self.weight_int8, self.scales, bias)

    def decode_operands(self) -> tuple:
        return ("q8", self.weight_int8, self.scales, None, 0, 0)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        return self.weight_int8[rows].float() * self.scales[rows][:, None]

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        return lk.ext().dequant_q8(self.weight_int8[rows], self.scales[rows], 0, bf16)

    def _prepack(self) -> None:
        if not K.cpu_has_vnni() and int(self.weight_int8.abs().max()) > 63:
            # Quantized on a VNNI machine: without VNNI oneDNN would saturate, so drop to 7-bit weights.
            warnings.warn(
                "Int8DynamicLinear: no VNNI on this CPU, re-quantizing weights to 7 bits", stacklevel=3
            )
            q, s = K.int8_symmetric(self.weight_int8.float() * self.scales[:, None], qmax=63)
            self.weight_int8.copy_(q)
            self.scales.copy_(s)
        K.require_kernel("onednn::qlinear_pointwise", self.weight_int8.device, "int8 dynamic matmul")
        self._onednn = K.onednn_prepack(self.weight_int8)
        self._zp = torch.zeros(self.out_features, dtype=torch.int64)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """CPU fp32 inference with the C++ row passes (kernels/int8_rows.cpp): quantize in one pass,
        per-token scale + bias (+ GELU / residual) in one pass over the GEMM's output."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and (self.bias is None or self.bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or self._needs_grad()))
            and not lk.tracing()
            and lk.available()
        )

    def forward_epilogue(
        self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.gelu(self(x)) (erf form) when gelu, then residual + that when given (models/bert._linear).

        On CPU fp32 inference at GEMM sizes the per-token rescale, bias, GELU and residual add are one
        pass over the int8 GEMM's fp32 output, in place: no [M, N] temporaries (whose page faults and
        passes cost more than the int8 GEMM itself at 256-token MiniLM batches)."""
        big = x.numel() >= self.min_tokens * self.in_features
        if big and self._fused_ok(x):
            xi = self._in(x)
            if self._onednn is None:
                self._prepack()
            xq, s = lk.ext().quantize_rows_u8(xi)  # bit for bit K.quantize_rows_int8(xi, shift=128)
            y = K.int8_dynamic_mm_cpu(xq, self._onednn, self.scales, self._zp)  # fp32 [M, N]
            res = None if residual is None else residual.reshape(-1, self.out_features)
            bias = None if self.bias is None else self.bias.detach()
            lk.ext().int8_epilogue_(y, s, bias, gelu, res)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = self._forward(x)
        if gelu:
            y = torch.nn.functional.gelu(y)
        return y if residual is None else residual + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_epilogue(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_tokens * self.in_features or torch.jit.is_tracing():
            return super().forward(x)  # decode-sized: weight-only int8 (the GEMV kernel) wins
        xi = self._in(x)
        if xi.device.type == "cpu":
            if self._onednn is None:
                self._prepack()
            xq, s = K.quantize_rows_int8(xi, shift=128)
            y = K.int8_dynamic_mm_cpu(xq, self._onednn, self.scales, self._zp)  # fp32 [M, N]
        else:
            K.require_kernel("aten::_int_mm", xi.device, "int8 dynamic matmul")
            xq, s = K.quantize_rows_int8(xi)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * self.scales
        if x.dtype == torch.float32:  # in place: a new [M, N] output would cost page faults too
            y = y.mul_(s) if self.bias is None else y.mul_(s).add_(self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = y.mul_(s).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weights=int8 per_channel, activations=int8 per_token"
