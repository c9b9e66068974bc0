"""BF16Linear: a Linear whose weight is stored in bfloat16 and applied in fp32.

Why: most checkpoints ship their weights in bf16, and leanformer runs them in fp32, so a decode step
streams twice the bytes the file holds. Kept in bf16 (exactly the shipped values: fp32 -> bf16 of a
weight that was bf16 is lossless), the weight takes half the memory, and the decode GEMV
(kernels/gemv.cpp linear_bf16) widens each value in registers and runs the fp32 loop on it: the same
result, bit for bit, as the fp32 GEMV on the weight made fp32, at half the bytes read. A whole-model
bf16 cast (`load(..., dtype="bfloat16")`) instead rounds every activation to bf16 and decodes through
oneDNN's bf16 matmul, slower than fp32 at one row.

Prefill (more rows than the GEMV takes) goes through QuantLinear._matmul: on a CPU with native bf16
the weight's rows as they are against bf16 activations (oneDNN), elsewhere the rows made fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer import kernels as lk
from leanformer.compress.qbase import QuantLinear


class BF16Linear(QuantLinear):
    """y = x @ W.T + b with W bf16 [N, K] (buffer `weight_bf16`, in the state dict as it is), fp32 math."""

    KEEP_DTYPE = {"weight_bf16": torch.bfloat16}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer(
            "weight_bf16", torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        """The Linear's weight rounded to bf16 (round to nearest even; exact for a bf16 checkpoint)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        m.weight_bf16.copy_(w.detach())
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lk.ext().linear_bf16(x, self.weight_bf16, bias)

    def decode_operands(self) -> tuple:
        return ("bf16", self.weight_bf16, None, None, 0, 0)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        return self.weight_bf16[rows].float()

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        w = self.weight_bf16[rows]
        return w if bf16 else w.float()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=bfloat16"
