"""Int8Linear: int8 weights with one scale per output channel, or per group of input columns (GGUF Q8_0
loads with 32-column groups, exactly)."""

from __future__ import annotations

import torch
from torch import nn

from leanformer import kernels as lk
from leanformer.compress import kernels as K
from leanformer.compress.qbase import QuantLinear
from leanformer.errors import LeanformerError
from leanformer.kernels import cpu


class Int8Linear(QuantLinear):
    """y = x @ (q * scales).T + b with q int8 [N, K] symmetric.

    Buffers (state dict and runtime alike): `weight_int8` int8 [N, K]; `scales` fp32 [N] (per channel,
    group_size None) or [N, ceil(K / group_size)] (per group of columns), at group 32 held as fp16 where
    fp16 holds every value (GGUF Q8_0; the kernels read fp16). Saved scales take the smallest exact float
    dtype (bf16 for round-to-nearest, as older saves)."""

    EXACT = ("scales", "input_scale")
    COMPACT = ("scales",)
    HALF_SCALES = ("scales",)  # GGUF Q8_0's fp16 block scales, held as such (QuantLinear.compact_scales)
    # Set by the fused decode step (models/fused.py) for the LM head to the activations its layers use:
    # True runs the kernel on int8 activations per block of 32 (kernels/gemv_i8.cpp), like llama.cpp's
    # Q8_0 head; the prefill / dequantize paths are unaffected.
    int8_activations: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        group_size: int | None = None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        if group_size is not None and group_size <= 0:
            raise LeanformerError(f"int8 group_size must be positive, got {group_size}")
        self.group_size = group_size
        shape = (out_features,) if group_size is None else (out_features, K.n_groups(in_features, group_size))
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(shape, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, q: torch.Tensor | None = None, scales: torch.Tensor | None = None
    ) -> Int8Linear:
        """Round-to-nearest per channel unless integer values (e.g. from GPTQ) are given."""
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            linear.weight.device,
            linear.weight.dtype,
        )
        if q is None:  # rows are independent: in slices of ~4M weights, so the temporaries of a
            # [128256, 3072] LM head stay ~16 MB each instead of three full fp32 copies
            w, rows = linear.weight.detach(), max(1, (1 << 22) // max(linear.in_features, 1))
            for r in range(0, w.shape[0], rows):
                q, scales = K.int8_symmetric(w[r : r + rows])
                m.weight_int8[r : r + rows].copy_(q)
                m.scales[r : r + rows].copy_(scales)
        else:
            m.weight_int8.copy_(q)
            m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _reads_half_scales(self) -> bool:
        # group 32 over whole blocks: every int8-activation loop reads fp16 (kernels/gemv_i8.cpp)
        return self.group_size == 32 and self.in_features % 32 == 0

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.int8_activations and ((self.group_size or 0) % 32 == 0 or self.group_size == 16):
            return lk.ext().linear_q8_i8(x, self.weight_int8, self.scales, bias, self.group_size or 0)
        return lk.ext().linear_q8(x, self.weight_int8, self.scales, bias, self.group_size or 0)

    def decode_operands(self) -> tuple:
        return ("q8", self.weight_int8, self.scales, None, self.group_size or 0, 0)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """fp32 [R, K]; rows a slice or an index tensor."""
        q, s = self.weight_int8[rows], self.scales[rows].float()
        if self.group_size is None:
            return q.float() * s[:, None]
        n, k = q.shape
        g = self.group_size
        if k % g == 0:  # [R, G, g] * [R, G, 1]: no repeated scale tensor
            return (q.view(n, -1, g).float() * s[:, :, None]).view(n, k)
        return q.float() * s.repeat_interleave(g, 1)[:, :k]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8_prefill(x):  # kernels/gemm_q4_i8.cpp's int8-weight GEMM: no dequantized copy
            return lk.ext().gemm_q8_i8(x.float(), self.weight_int8, self.scales, self.group_size or 0)
        return super()._matmul(x)

    def _int8_prefill(self, x: torch.Tensor) -> bool:
        """int8 activations for a prefill where the GEMM runs: AVX-VNNI / AVX-512 VNNI (AVX2's maddubs
        would saturate on int8 x int8), K a multiple of 32, groups of 32 columns or one scale per row."""
        k, g = self.in_features, self.group_size
        return (
            x.device.type == "cpu"
            and k % 32 == 0
            and (g is None or (g % 32 == 0 and k % g == 0))
            and not lk.tracing()
            and not (torch.is_grad_enabled() and x.requires_grad)
            and lk.available()
            and cpu.act_isa() in ("avx_vnni", "avx512_vnni")
            and cpu.int8_activations(self.prefill_activations)
        )

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        return lk.ext().dequant_q8(self.weight_int8[rows], self.scales[rows], self.group_size or 0, bf16)

    def extra_repr(self) -> str:
        kind = "per_channel" if self.group_size is None else f"group_size={self.group_size}"
        return super().extra_repr() + f", bits=8, {kind}"
