"""PackedLinear: a Linear whose fp32/bf16 weight is pre-packed for oneDNN (CPU prefill / encoder GEMMs), and the helpers that pack or copy it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """nn.Linear whose forward runs oneDNN on a pre-packed copy of the weight.

    Why: on CPU, torch's default fp32 F.linear at small batch goes to a single-threaded MKL GEMV
    (~16 GB/s here); oneDNN with a packed weight uses both cores and is ~1.5-2x faster on the
    memory-bound decode step (see PERF-FACTS.md). It stays an nn.Linear (same `weight`, same
    state_dict) so quantization and saving treat it like any Linear; the packed copy is a
    non-persistent buffer.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        new = adopt_linear(cls, linear)
        new.repack()
        return new

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        return deepcopy_repacked(self, memo)

    def repack(self) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packed_ok(x, self.weight):
            return nn.functional.linear(x, self.weight, self.bias)
        shape = x.shape
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, shape[-1]), self.packed_weight, bias, "none", [], ""
        )
        return y.reshape(*shape[:-1], self.out_features)


def adopt_linear(cls: type, linear: nn.Linear):
    """A `cls` (an nn.Linear subclass) sharing `linear`'s Parameters, made without initializing any."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
    return new


def packed_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a call may run on the packed copy: no autograd, and x in the weight's dtype with no
    autocast (a bf16 autocast region, e.g. distillation on a CPU with native bf16, hands fp32-packed
    weights bf16 inputs that oneDNN has no primitive for; F.linear casts them)."""
    return (
        not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and x.dtype == weight.dtype
    )


def deepcopy_repacked(linear: nn.Linear, memo: dict) -> nn.Linear:
    """copy.deepcopy for a Linear that may hold a oneDNN-packed `packed_weight` buffer: those opaque
    tensors cannot be deep-copied, so copy everything else and pack the copy's weight anew."""
    new = type(linear).__new__(type(linear))
    memo[id(linear)] = new
    state = {k: v for k, v in linear.__dict__.items() if k != "_buffers"}
    new.__dict__.update(copy.deepcopy(state, memo))
    new._buffers = {}
    if linear._buffers.get("packed_weight") is not None:
        packed = torch.ops.mkldnn._reorder_linear_weight(new.weight.detach(), 1)
        new.register_buffer("packed_weight", packed, persistent=False)
    return new


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_linears_(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every plain nn.Linear of a CPU float model for a PackedLinear (in place), except the
    direct children named in `skip`."""
    for name, child in list(model.named_children()):
        if name in skip:
            continue
        if type(child) is nn.Linear and can_pack(child.weight.dtype, child.weight.device):
            try:
                setattr(model, name, PackedLinear.from_linear(child))
            except (
                RuntimeError
            ):  # oneDNN lacks a kernel for this dtype on this CPU (e.g. bf16 without AVX-512)
                return model
        else:
            pack_linears_(child)
    return model
