"""The quantized Linear modules that configs swap in (torchao's `quantize_` shape); the configs are in
config.py and re-exported here.

Each module's forward is one packed-kernel call. The weight-only kernels are fast only with bf16
activations, so inputs are cast to bf16 and the result cast back to the input dtype (a no-op for a bf16
model). State dicts hold a portable form (int8 rows, int4 nibbles + bf16 scales/zeros), never the
machine-specific packed layout, so a saved model reloads on another CPU or on a GPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanformerError
from . import kernels as K
from .config import (  # noqa: F401  (configs live beside their modules for `from .quant import ...`)
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

# ------------------------------------------------------------------------------------------ modules


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


PREFILL_DEQUANT_ROWS = 128  # Int8Linear rows from which a CPU without native bf16 dequantizes instead


class _QLinear(nn.Module):
    """Shared plumbing: shapes, bias, optional AWQ input scale, reshaping [..., K] -> [M, K]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), False) if bias else None
        )
        # AWQ's 1/s when it could not be folded upstream: x * input_scale before the matmul, [K].
        self.register_buffer("input_scale", None)

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        self.input_scale = None if scale is None else scale.detach().float().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The buffer exists only for some AWQ layers: create it when the file has it (structure_only
        # models cannot know in advance which layers were folded).
        key = prefix + "input_scale"
        if self.input_scale is None and key in state_dict:
            self.input_scale = torch.empty_like(state_dict[key], device=self._buffer_device())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _buffer_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return x

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return s + (", awq_input_scale=True" if self.input_scale is not None else "")


class Int8Linear(_QLinear):
    """y = x @ (q * scales).T + b with q int8 [N, K] per-channel symmetric; bf16 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, q: torch.Tensor | None = None, scales: torch.Tensor | None = None
    ) -> Int8Linear:
        """Round-to-nearest unless integer values (e.g. from GPTQ) are given."""
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.device,
            linear.weight.dtype,
        )
        if q is None:
            q, scales = K.int8_symmetric(linear.weight.detach())
        m.weight_int8.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.scales = self.scales.to(torch.bfloat16)  # the kernel needs bf16 scales whatever .to() said
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.scales = self.scales.to(torch.bfloat16)  # a loader may have cast floats to the model dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = self._in(x)
        if xi.shape[0] >= PREFILL_DEQUANT_ROWS and xi.device.type == "cpu" and not K.cpu_has_native_bf16():
            # Long prefill on a CPU without native bf16: dequantize once and use the float GEMM.
            w = self.weight_int8.to(xi.dtype) * self.scales.to(xi.dtype)[:, None]
            return self._out(F.linear(xi, w), x)
        y = K.int8_mm(xi.to(torch.bfloat16), self.weight_int8, self.scales)
        return self._out(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=8, per_channel"


class Int4Linear(_QLinear):
    """y = x @ dequant(W).T + b, W int4 group-wise: w = (q - 8) * scale + zero per [row, group].

    State dict: `qweight` uint8 [N, Kp/2] (two codes per byte, Kp = in_features rounded up to a group
    multiple), `scales`/`zeros` bf16 [N, G]. In memory only the kernel's packed layout is kept (rows
    padded to a multiple of 16); the portable codes are rebuilt from it when saving."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        if group_size not in K.INT4_GROUP_SIZES:
            raise LeanformerError(f"int4 group_size must be one of {K.INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = group_size
        g = K.n_groups(in_features, group_size)
        self.k_padded = g * group_size
        self.n_padded = -(-out_features // K.INT4_N_MULTIPLE) * K.INT4_N_MULTIPLE
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.bfloat16, device=device))
        self._packed: torch.Tensor | None = None  # kernel layout, device-specific; None until codes set
        self._sz: torch.Tensor | None = None  # bf16 [G, Np, 2]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Round-to-nearest unless codes uint8 [N, K] with scales/zeros [N, G] are given (GPTQ, AWQ)."""
        w = linear.weight.detach()
        m = cls(
            linear.in_features, linear.out_features, group_size, linear.bias is not None, w.device, w.dtype
        )
        if codes is None:
            scales, zeros = K.int4_params(w, group_size)
            codes = K.int4_codes(w, scales, zeros, group_size)
        m.scales.copy_(scales)
        m.zeros.copy_(zeros)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        m.set_codes(codes)
        return m

    def set_codes(self, codes: torch.Tensor) -> None:
        """codes uint8 [N, K or Kp] -> pad to [Np, Kp] (code 8 = dequant to `zero`, irrelevant since the
        padded input columns are zero) and pack for the kernel on the buffers' device."""
        n, k = codes.shape
        full = torch.full((self.n_padded, self.k_padded), 8, dtype=torch.uint8, device=codes.device)
        full[:n, :k] = codes
        dev = self.scales.device
        self._packed = K.int4_pack(full, dev)
        self._rebuild_sz()

    def _rebuild_sz(self) -> None:
        pad = self.n_padded - self.out_features
        s = F.pad(self.scales.to(torch.bfloat16), (0, 0, 0, pad), value=1.0)
        z = F.pad(self.zeros.to(torch.bfloat16), (0, 0, 0, pad))
        self._sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()  # [G, Np, 2]

    def codes(self) -> torch.Tensor:
        """Portable codes uint8 [N, Kp] recovered from the packed layout."""
        if self._packed is None:
            raise LeanformerError("Int4Linear has no weights yet (structure only): load a state dict first")
        c = K.int4_unpack(self._packed, self.n_padded, self.k_padded, self.group_size)
        return c[: self.out_features].contiguous()

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weight the kernel effectively uses."""
        w = K.int4_dequant(self.codes(), self.scales, self.zeros, self.group_size)[:, : self.in_features]
        return w if self.input_scale is None else w * self.input_scale

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is None:  # structure only (e.g. on meta): a placeholder of the right shape
            shape = (self.out_features, self.k_padded // 2)
            destination[prefix + "qweight"] = torch.empty(shape, dtype=torch.uint8, device=self.scales.device)
        else:
            destination[prefix + "qweight"] = K.pack_nibbles(self.codes()).cpu()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors
    ):
        qweight = state_dict.pop(prefix + "qweight", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors
        )
        if qweight is None:
            missing_keys.append(prefix + "qweight")
            return
        want = (self.out_features, self.k_padded // 2)
        if tuple(qweight.shape) != want:
            errors.append(f"size mismatch for {prefix}qweight: file {tuple(qweight.shape)}, module {want}")
            return
        self.scales = self.scales.to(torch.bfloat16)
        self.zeros = self.zeros.to(torch.bfloat16)
        self.set_codes(K.unpack_nibbles(qweight.to(self.scales.device)))

    def _apply(self, fn, *args, **kwargs):
        # Moving devices changes the packed layout: unpack on the old device, repack on the new one.
        old = self.scales.device
        moving = self._packed is not None and fn(torch.empty(0, device=old)).device != old
        codes = self.codes() if moving else None
        super()._apply(fn, *args, **kwargs)
        self.scales, self.zeros = self.scales.to(torch.bfloat16), self.zeros.to(torch.bfloat16)
        if codes is not None:
            self.set_codes(codes.to(self.scales.device))
        elif self._packed is not None:
            self._rebuild_sz()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = self._in(x).to(torch.bfloat16)
        if self.k_padded != self.in_features:
            xi = F.pad(xi, (0, self.k_padded - self.in_features))
        y = K.int4_mm(xi.contiguous(), self._packed, self.group_size, self._sz)
        if self.n_padded != self.out_features:
            y = y[:, : self.out_features]
        return self._out(y, x)

    def extra_repr(self) -> str:
        pad = ", padded_in" if self.k_padded != self.in_features else ""
        return super().extra_repr() + f", bits=4, group_size={self.group_size}{pad}"


class Int8DynamicLinear(_QLinear):
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

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.scales = self.scales.float()
        self._onednn = None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.scales = self.scales.float()
        self._onednn = None
        return self

    def __getstate__(self) -> dict:
        # The oneDNN-packed weight is an opaque tensor: copy.deepcopy/pickle cannot copy it; rebuild later.
        return {**super().__getstate__(), "_onednn": None}

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = self._in(x)
        if xi.shape[0] < self.min_tokens:  # decode-sized: the weight-only kernel wins
            y = K.int8_mm(xi.to(torch.bfloat16), self.weight_int8, self.scales.to(torch.bfloat16))
            return self._out(y, x)
        if xi.device.type == "cpu":
            if self._onednn is None:
                self._prepack()
            xq, s = K.quantize_rows_int8(xi, shift=128)
            y = K.int8_dynamic_mm_cpu(xq, self._onednn, self.scales, self._zp)  # fp32 [M, N]
        else:
            K.require_kernel("aten::_int_mm", xi.device, "int8 dynamic matmul")
            xq, s = K.quantize_rows_int8(xi)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * self.scales
        if self.bias is not None and x.dtype == torch.float32:  # one fused pass: y * s + b
            return torch.addcmul(self.bias, y, s).reshape(*x.shape[:-1], self.out_features)
        return self._out(y.mul_(s), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weights=int8 per_channel, activations=int8 per_token"
