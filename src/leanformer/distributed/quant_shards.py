"""Slicing compress/'s weight-only Linears (Int8Linear, Int4Linear, BF16Linear / F16Linear) for tensor parallel.

Rows (output channels) are independent in both: every buffer whose first dim is out_features
(codes, scales, zeros, 8-bit scale codes, bias) is sliced along it, exactly. Columns (input channels)
are grouped: int8 per channel keeps its scales [N] (one per row, valid for any columns), grouped
int8 / int4 slice their scales [N, G] by whole groups, so a column range must start on a group
boundary and end on one (or at in_features, keeping the last group's padding). AWQ's input_scale
[K] is sliced with the columns.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from leanformer.errors import LeanformerError

# buffers laid out [N, K] (int8 codes, bf16 / fp16 weights) / [N, Kp/2] (int4 nibbles, two columns per byte)
_CODES = {"weight_int8": 1, "weight_bf16": 1, "weight_f16": 1, "qweight": 2}  # name → columns per element
_GROUPED = ("scales", "zeros", "scale_codes", "zero_codes")  # [N, G] (int8 per-channel scales: [N])


def is_quantized(module: nn.Module) -> bool:
    """An int8 / int4 / bf16 / fp16 module these slicers can cut (not int5: its 5th-bit plane `qhigh` is packed per
    64-column chunk, so tensor parallel refuses it in one line)."""
    return any(name in module._buffers for name in _CODES) and "qhigh" not in module._buffers


def column_unit(module: nn.Module) -> int:
    """The granularity (in input columns) at which `module` may be cut by columns."""
    return (getattr(module, "group_size", None) or 1) if is_quantized(module) else 1


def _clone_with(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of `module` with its own parameter / buffer dicts holding `tensors` (contiguous
    copies: the full module's storage can then be freed)."""
    new = copy.copy(module)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    for name, t in tensors.items():
        t = t.detach().contiguous().clone()
        if name in new._parameters:
            new._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=False)
        else:
            new._buffers[name] = t
    new._drop_caches()
    return new


def quant_rows(module: nn.Module, spans: list[tuple[int, int]]) -> nn.Module:
    """Output rows [a, b) of every span, concatenated (a column-parallel shard), exactly."""
    n = module.out_features
    tensors = {}
    for name, t in [*module._buffers.items(), *module._parameters.items()]:
        if t is not None and t.dim() >= 1 and t.shape[0] == n and name not in ("input_scale", "scale_ranges"):
            tensors[name] = torch.cat([t[a:b] for a, b in spans])
    new = _clone_with(module, tensors)
    new.out_features = sum(b - a for a, b in spans)
    return new


def quant_cols(module: nn.Module, lo: int, hi: int) -> nn.Module:
    """Input columns [lo, hi) without the bias (a row-parallel shard; the bias is added after the sum)."""
    group = getattr(module, "group_size", None)
    unit = group or 1
    if lo % unit or (hi % unit and hi != module.in_features):
        raise LeanformerError(
            f"cannot cut a {type(module).__name__} with groups of {unit} columns at columns {lo}..{hi}: "
            "tensor parallel needs group boundaries (quantize with a group size that divides the "
            "per-rank head and MLP widths, or shard before quantizing)"
        )
    g_lo, g_hi = lo // unit, -(-hi // unit)  # the groups [g_lo, g_hi) cover the columns
    tensors: dict[str, torch.Tensor | None] = {}
    for name, per in _CODES.items():
        if name in module._buffers:
            end = hi if hi != module.in_features else module._buffers[name].shape[1] * per  # keep padding
            tensors[name] = module._buffers[name][:, lo // per : end // per]
    if group:
        for name in _GROUPED:
            if module._buffers.get(name) is not None:
                tensors[name] = module._buffers[name][:, g_lo:g_hi]
    if module._buffers.get("input_scale") is not None:
        tensors["input_scale"] = module._buffers["input_scale"][lo:hi]
    new = _clone_with(module, tensors)
    new._parameters["bias"] = None
    new.in_features = hi - lo
    if hasattr(new, "k_padded"):
        new.k_padded = (g_hi - g_lo) * unit
    return new
