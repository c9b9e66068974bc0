"""BF16Linear / F16Linear: a Linear whose weight is stored in bfloat16 / float16 and applied in fp32.

Why: most checkpoints ship their weights in bf16, and GGUF files made by llama.cpp's converter hold F16
(or BF16) tensors, while leanformer runs float models in fp32, so a decode step streamed twice the bytes
the file holds. Kept in 16 bits (exactly the shipped values: fp32 -> bf16 of a weight that was bf16 is
lossless), the weight takes half the memory, and the decode GEMV (kernels/gemv.cpp linear_bf16 /
linear_f16) widens each value in registers and runs the fp32 loop on it: the same result, bit for bit,
as the fp32 GEMV on the weight made fp32, at half the bytes read. A whole-model bf16 cast (`load(...,
dtype="bfloat16")`) instead rounds every activation to bf16 and decodes through oneDNN's bf16 matmul,
slower than fp32 at one row.

Prefill (more rows than the GEMV takes) goes through QuantLinear._matmul: on a CPU with native bf16 the
weight's rows in bf16 against bf16 activations (oneDNN; a bf16 weight as it is), elsewhere the rows made
fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from leanformer import kernels as lk
from leanformer.compress.qbase import QuantLinear
from leanformer.errors import LeanformerError


class HalfLinear(QuantLinear):
    """y = x @ W.T + b with W [N, K] in a 16-bit float dtype (the buffer `BUFFER`, in the state dict as
    it is), fp32 math. Subclasses name the dtype, the buffer and the fused step's kernel kind."""

    DTYPE: ClassVar[torch.dtype]
    BUFFER: ClassVar[str]
    KIND: ClassVar[str]  # DecodeLinear's kind, and the kernel linear_<KIND>

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer(
            self.BUFFER, torch.zeros(out_features, in_features, dtype=self.DTYPE, device=device)
        )

    @property
    def weight16(self) -> torch.Tensor:
        return self._buffers[self.BUFFER]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalfLinear:
        """The Linear's weight rounded to the dtype (to nearest even; exact for weights already in it)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        m.weight16.copy_(w.detach())
        if not bool(torch.isfinite(m.weight16).all()) and bool(torch.isfinite(w).all()):
            big = float(w.detach().abs().max())
            raise LeanformerError(
                f"a Linear [{m.out_features}, {m.in_features}] has weights up to |w| = {big:g}, beyond "
                f"{str(cls.DTYPE).removeprefix('torch.')}'s range; use BF16WeightOnly or ignore that Linear"
            )
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return getattr(lk.ext(), f"linear_{self.KIND}")(x, self.weight16, bias)

    def decode_operands(self) -> tuple:
        return (self.KIND, self.weight16, None, None, 0, 0)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        return self.weight16[rows].float()

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        # fp16 -> bf16 through fp32: torch's direct conversion is 5x slower
        from leanformer.models.kv_cache import cast

        return cast(
            self.weight16[rows], torch.bfloat16 if bf16 else torch.float32
        )  # a view when bf16 and bf16

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight={str(self.DTYPE).removeprefix('torch.')}"


class BF16Linear(HalfLinear):
    """Weight in bfloat16 (`weight_bf16`): half of fp32, lossless for bf16 checkpoints and GGUF BF16."""

    DTYPE, BUFFER, KIND = torch.bfloat16, "weight_bf16", "bf16"
    KEEP_DTYPE = {"weight_bf16": torch.bfloat16}


class F16Linear(HalfLinear):
    """Weight in IEEE float16 (`weight_f16`): GGUF F16 tensors as the file holds them."""

    DTYPE, BUFFER, KIND = torch.float16, "weight_f16", "f16"
    KEEP_DTYPE = {"weight_f16": torch.float16}


HALF_LINEARS: dict[str, type[HalfLinear]] = {cls.__name__: cls for cls in (BF16Linear, F16Linear)}
