"""FastLinear: an nn.Linear whose small-batch (decode) forward runs the AVX2/AVX-512 GEMV kernel.

Same `weight`/`bias` Parameters and state_dict as the Linear it replaces, so quantization, saving and
loading treat it like any Linear. Large inputs (prefill) keep torch's path: oneDNN on the pre-packed
weight when the source was a models.layers.PackedLinear, F.linear otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.kernels import available, ext, tracing
from leanformer.kernels.packed import PackedLinear, deepcopy_repacked, packed_ok

MAX_ROWS = (
    16  # chunks of 8 rows re-read W, yet measured ahead of oneDNN up to 16 rows (even at 32, behind at 128)
)


class FastLinear(nn.Linear):
    """nn.Linear: rows <= max_rows (and no autograd) -> leanformer GEMV kernel; else torch."""

    max_rows: int = MAX_ROWS

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FastLinear:
        """Wrap `linear` sharing its Parameters. A PackedLinear's oneDNN copy is kept for large inputs."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        packed = getattr(linear, "packed_weight", None)
        if packed is not None:  # non-persistent, like PackedLinear's: the state_dict is unchanged
            new.register_buffer("packed_weight", packed, persistent=False)
        return new

    def repack(self) -> None:
        """Rebuild the oneDNN copy after the weight changed in place (compress/awq.py calls this)."""
        if getattr(self, "packed_weight", None) is not None:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
            self.register_buffer("packed_weight", packed, persistent=False)

    def __deepcopy__(self, memo: dict) -> FastLinear:
        return deepcopy_repacked(self, memo)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return (
            x.numel() > 0
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() <= self.max_rows * self.in_features
            and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))
            and available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            # exporters and torch.compile must see an ordinary linear, not a pybind or oneDNN call
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        if self._kernel_ok(x):
            bias = None if self.bias is None else self.bias.detach()
            y = ext().linear_f32(x.reshape(-1, shape[-1]), self.weight.detach(), bias)
            return y.view(*shape[:-1], self.out_features)
        packed = getattr(self, "packed_weight", None)
        if packed is not None and packed_ok(x, self.weight):
            bias = None if self.bias is None else self.bias.detach()
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
            return y.reshape(*shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_fast_linears_(model: nn.Module) -> nn.Module:
    """Swap every fp32 CPU nn.Linear / PackedLinear of `model` for a FastLinear (in place).

    Subclasses other than PackedLinear (quantized Linears, ...) are left alone: their forward is
    not a plain x @ W^T. Does nothing when the kernels are unavailable on this machine.
    """
    if not available():
        return model
    for name, child in list(model.named_children()):
        if (
            type(child) in (nn.Linear, PackedLinear)
            and child.weight.dtype == torch.float32
            and child.weight.device.type == "cpu"
        ):
            setattr(model, name, FastLinear.from_linear(child))
        else:
            use_fast_linears_(child)
    return model


@contextmanager
def plain_linears(model: nn.Module):
    """Temporarily swap leanformer's fast Linears (oneDNN PackedLinear, GEMV FastLinear, fp16 H16Linear) for
    nn.Linears sharing their weights: autograd and the ONNX exporters need ordinary matmuls."""
    from leanformer.kernels.h16 import H16Linear

    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (PackedLinear, FastLinear, H16Linear)):
                plain = nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
