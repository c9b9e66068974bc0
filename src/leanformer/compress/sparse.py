"""Sparse storage of pruned weights: files (and, on request, memory) that really shrink.

Pruning (prune.py) writes zeros into dense weights, which cost the same bytes as the values they
replaced. The `SparseStorage` stage, run after pruning (and after an Int8WeightOnly stage, if any),
stores each pruned weight W [N, K] as

    sparse_mask   uint8 [N, ceil(K / 8)]  bit k % 8 of byte k // 8 set where column k is stored
    sparse_values [N, C]                  the stored values of each row, in column order

with the same C for every row (C = the largest non-zero count of a row; rows with fewer non-zeros store
some zeros too, so shapes follow from the recipe and a reload checks them before reading). 50% or 2:4
sparsity: fp32 4 → 2.125 bytes per weight, bf16 2 → 1.125, int8 codes 1 → 0.625. Works for any
pattern (unstructured, N:M), unlike an N:M index code.

In memory (`memory=`, a choice per saved model, changeable with `set_memory_`):
- "dense" (default): the module is the dense Linear again (FastLinear / Int8Linear: same kernels, the
  fused decode step, the same speed and bit-identical outputs); only its state dict is packed.
- "sparse" (fp32 / bf16 only): SparseLinear holds values + int16 column indices [N, C] (fp32 at 50%:
  3 bytes per weight instead of 4); decode runs torch's CSR matrix-vector product (MKL), prefill a
  dense copy per call. Measured slower than dense (docs/BENCHMARKS.md): it trades speed for memory.
  int8 codes + int16 indices would take more memory than dense int8, so int8 stays "dense".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.compress.config import QuantConfig, _register, matches
from leanformer.compress.int8 import Int8Linear
from leanformer.compress.qbase import set_module
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import FastLinear
from leanformer.kernels.packed import PackedLinear, can_pack

MEMORY = ("dense", "sparse")
MASK, VALUES = "sparse_mask", "sparse_values"


@_register
@dataclass
class SparseStorage(QuantConfig):
    """Store the zeros of pruned Linears compactly (bitmask + packed values) in saved files; `memory`
    "dense" keeps dense weights in memory (same speed), "sparse" keeps them packed (less memory,
    slower decode). `capacity` (name -> stored values per row) is filled when the stage is applied,
    so a reload rebuilds the same shapes; Linears whose packed form would not be smaller stay as
    they are. A stage after pruning: nothing is computed, no calibration."""

    memory: str = "dense"
    capacity: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.memory not in MEMORY:
            raise LeanformerError(f"SparseStorage: memory must be 'dense' or 'sparse', got {self.memory!r}")
        bad = [k for k, v in self.capacity.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if not isinstance(self.capacity, dict) or bad:
            raise LeanformerError(
                f"SparseStorage: capacity must map Linear names to counts >= 0, got {bad[:1]}"
            )

    def apply_to(self, model: nn.Module, structure_only: bool) -> None:
        """The recipe's hook (compress/recipe.py): pack now, or (structure_only) rebuild empty modules."""
        self.validate()
        if structure_only:
            if not self.capacity:  # a dry run (streaming's plan): capacities come from the weights
                raise LeanformerError(
                    "SparseStorage cannot run layer by layer: load the model whole (lazy=False; --in-memory)"
                )
            for name, c in self.capacity.items():
                set_module(model, name, _empty(model.get_submodule(name), c, self.memory))
            return
        store_(model, self)


# ------------------------------------------------------------------------------------ pack / unpack


def _stored(w: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool [N, K]: the positions stored, exactly `capacity` per row (every non-zero, then the first
    zeros of rows with fewer non-zeros)."""
    nz = w != 0
    counts = nz.sum(1)
    if int(counts.max()) > capacity:
        raise LeanformerError(
            f"a row holds {int(counts.max())} non-zeros, more than the {capacity} its sparse storage "
            "was built for (weights changed after pruning?); re-run SparseStorage on the model"
        )
    rank = (~nz).cumsum(1)  # 1-based rank of each zero within its row
    return nz | (~nz & (rank <= (capacity - counts)[:, None]))


def pack(w: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (float or int8) -> (mask uint8 [N, ceil(K/8)], values [N, capacity] in w's dtype)."""
    n, k = w.shape
    keep = _stored(w, capacity)
    values = w[keep].view(n, capacity)
    bits = F.pad(keep, (0, -k % 8)).view(n, -1, 8).to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    mask = (bits * weights).sum(-1, dtype=torch.uint8)  # [N, ceil(K/8)]
    return mask, values


def columns(mask: torch.Tensor, k: int, capacity: int) -> torch.Tensor:
    """mask uint8 [N, ceil(K/8)] -> the stored column of each value, int64 [N, capacity]."""
    n = mask.shape[0]
    if mask.dtype != torch.uint8 or mask.shape[1] != (k + 7) // 8:
        raise LeanformerError(
            f"sparse mask has shape {tuple(mask.shape)} / {mask.dtype}, expected uint8 [{n}, {(k + 7) // 8}]"
        )
    bits = (mask[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [N, K8, 8]
    keep = bits.view(n, -1)[:, :k].bool()
    counts = keep.sum(1)
    if bool((counts != capacity).any()):
        raise LeanformerError(
            f"corrupt sparse mask: rows store {int(counts.min())}..{int(counts.max())} values, expected {capacity}"
        )
    return keep.nonzero()[:, 1].view(n, capacity)


def unpack(mask: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """(mask [N, ceil(K/8)], values [N, C]) -> dense [N, K] in values' dtype (zeros elsewhere)."""
    n, c = values.shape
    out = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    return out.scatter_(1, columns(mask, k, c).to(values.device), values)


def _packed_shapes(
    n: int, k: int, capacity: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(n, (k + 7) // 8, dtype=torch.uint8, device=device),
        torch.empty(n, capacity, dtype=dtype, device=device),
    )


# ------------------------------------------------------------------------ dense in memory, packed on disk


class _PackedState:
    """Mixin for a dense Linear-like module: its state dict holds `sparse_mask` / `sparse_values`
    instead of the dense tensor `SPARSE` (packed on save, unpacked on load); everything else as the
    base class (kernels, fused decode, outputs)."""

    SPARSE = "weight"
    capacity: int = 0

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.pop(prefix + self.SPARSE).detach()
        if w.is_meta:
            mask, values = _packed_shapes(*w.shape, self.capacity, w.dtype, "meta")
        else:
            mask, values = pack(w, self.capacity)
        destination[prefix + MASK], destination[prefix + VALUES] = mask, values

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + MASK in state_dict and prefix + VALUES in state_dict:
            mask, values = state_dict.pop(prefix + MASK), state_dict.pop(prefix + VALUES)
            state_dict[prefix + self.SPARSE] = unpack(mask, values, self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pack_for_prefill()  # loading packs plain nn.Linears only


class SparseStoredLinear(_PackedState, FastLinear):
    """A FastLinear (dense fp32 / bf16 weight, GEMV at decode, fused step) saved packed."""

    def _pack_for_prefill(self) -> None:
        w = self.weight
        if w.is_meta or not can_pack(w.dtype, w.device):
            return
        try:  # like loading's oneDNN copy for prefill
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        except RuntimeError:  # no oneDNN kernel for this dtype on this CPU (bf16 without AVX-512)
            return
        self.register_buffer("packed_weight", packed, persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stored sparse ({self.capacity} of {self.in_features} per row)"


class SparseStoredInt8Linear(_PackedState, Int8Linear):
    """An Int8Linear (dense int8 codes in memory, its kernels and the fused step) saved packed."""

    SPARSE = "weight_int8"

    def _pack_for_prefill(self) -> None:
        pass

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stored sparse ({self.capacity} of {self.in_features} per row)"


# ------------------------------------------------------------------------------------ sparse in memory


class SparseLinear(nn.Module):
    """y = x W^T + b with W held as values [N, C] + int16 column indices [N, C] (int32 when K > 32767).

    Decode rows (≤ `mv_rows`, fp32 math) go through torch's CSR matrix-vector product; larger inputs
    build the dense W for the call. Same results as the dense Linear up to summation order. Saved as
    the packed bitmask layout, like the dense-memory modules."""

    mv_rows = 1  # measured: the CSR product loses to a dense copy + GEMM from 2 rows on

    def __init__(
        self, in_features: int, out_features: int, capacity: int, bias: bool, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.capacity = in_features, out_features, capacity
        idx = torch.int16 if in_features <= 32767 else torch.int32
        self.register_buffer(
            "values", torch.zeros(out_features, capacity, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "cols", torch.zeros(out_features, capacity, device=device, dtype=idx), persistent=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), False) if bias else None
        )

    @classmethod
    def from_dense(cls, lin: nn.Linear, capacity: int) -> SparseLinear:
        w = lin.weight.detach()
        new = cls(lin.in_features, lin.out_features, capacity, lin.bias is not None, w.device, w.dtype)
        keep = _stored(w, capacity)
        new.values = w[keep].view(w.shape[0], capacity).contiguous()
        new.cols = keep.nonzero()[:, 1].view(w.shape[0], capacity).to(new.cols.dtype)
        if lin.bias is not None:
            new.bias.data = lin.bias.detach().clone()
        return new

    def dense_weight(self) -> torch.Tensor:
        """[N, K] in the values' dtype."""
        out = torch.zeros(
            self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device
        )
        return out.scatter_(1, self.cols.long(), self.values)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.values.is_meta:
            mask, values = _packed_shapes(
                self.out_features, self.in_features, self.capacity, self.values.dtype, "meta"
            )
        else:
            mask, values = pack(self.dense_weight(), self.capacity)
        destination[prefix + MASK], destination[prefix + VALUES] = mask, values

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask, values = state_dict.pop(prefix + MASK, None), state_dict.pop(prefix + VALUES, None)
        if mask is not None and values is not None:
            self.cols = columns(mask, self.in_features, self.capacity).to(self.cols.dtype)
            self.values = values.contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.detach()
        if x2.shape[0] <= self.mv_rows and x2.device.type == "cpu" and torch.backends.mkl.is_available():
            n, c = self.values.shape
            crow = torch.arange(0, (n + 1) * c, c, dtype=torch.int32)
            csr = torch.sparse_csr_tensor(
                crow, self.cols.view(-1).int(), self.values.view(-1).float(), (n, self.in_features),
                check_invariants=False,  # built here from checked columns
            )  # fmt: skip
            y = torch.stack([torch.mv(csr, r) for r in x2.float()])
            if bias is not None:
                y = y + bias.float()
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, self.dense_weight().to(x.dtype), bias if bias is None else bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, stored {self.capacity} per row"


# --------------------------------------------------------------------------------------------- apply

_FLOAT = (nn.Linear, FastLinear, PackedLinear, SparseStoredLinear)


def _kind(m: nn.Module) -> str | None:
    if type(m) in (Int8Linear, SparseStoredInt8Linear):
        return "int8"
    if type(m) in _FLOAT and m.weight.is_floating_point():
        return "float"
    return None


def _empty(m: nn.Module, capacity: int, memory: str) -> nn.Module:
    """The module that stores `m`'s weight sparsely (structure only: no values)."""
    kind = _kind(m)
    if kind is None:
        raise LeanformerError(
            f"SparseStorage: cannot store a {type(m).__name__} sparsely (fp32 / bf16 Linears and Int8Linear only)"
        )
    if memory == "sparse":
        if kind == "int8":
            raise LeanformerError(
                "SparseStorage: memory='sparse' holds fp32 / bf16 weights only (int8 codes + indices outgrow dense int8); use memory='dense'"
            )
        w = m.weight
        return SparseLinear(m.in_features, m.out_features, capacity, m.bias is not None, w.device, w.dtype)
    m.__class__ = SparseStoredInt8Linear if kind == "int8" else SparseStoredLinear  # same state, packed saves
    m.capacity = capacity
    return m


def _dense_tensor(m: nn.Module) -> torch.Tensor:
    return m.weight_int8 if _kind(m) == "int8" else m.weight.detach()


def smaller_when_packed(n: int, k: int, capacity: int, elem_bytes: int) -> bool:
    return n * (capacity * elem_bytes + (k + 7) // 8) < n * k * elem_bytes


@torch.no_grad()
def store_(model: nn.Module, cfg: SparseStorage) -> dict[str, int]:
    """Swap every targeted pruned Linear for its sparse-stored form; fills cfg.capacity. Returns it."""
    names = [
        n
        for n, m in model.named_modules()
        if _kind(m) and n and matches(n, cfg.targets) and not matches(n, cfg.ignore)
    ]
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for n in names:
        m = model.get_submodule(n)
        if _kind(m) == "float" and id(m.weight) in shared:
            raise LeanformerError(
                f"SparseStorage: {n} shares its weight with the embedding; add it to ignore"
            )
        w = _dense_tensor(m)
        c = int((w != 0).sum(1).max())
        if smaller_when_packed(*w.shape, c, w.element_size()):
            cfg.capacity[n] = c
    if not cfg.capacity:
        others = sorted(
            {
                type(m).__name__
                for n, m in model.named_modules()
                if n and matches(n, cfg.targets) and _kind(m) is None
            }
            & {"Int4Linear", "Int5Linear", "Int8DynamicLinear"}
        )
        if not names and others:  # the targets are quantized into a form that cannot be packed
            raise LeanformerError(
                f"SparseStorage packs fp32 / bf16 Linears and Int8Linear; the targets are {', '.join(others)}: "
                "put SparseStorage on int8 weights (Int8WeightOnly) or on the float model"
            )
        raise LeanformerError(
            "SparseStorage: no targeted Linear has enough zeros to be stored smaller; prune it first "
            "(Magnitude / Wanda / SparseGPT, e.g. the preset wanda-50)"
        )
    for n, c in cfg.capacity.items():
        m = model.get_submodule(n)
        if cfg.memory == "sparse":
            set_module(model, n, SparseLinear.from_dense(m, c))
        else:
            _empty(m, c, "dense")
    return cfg.capacity


def set_memory_(model: nn.Module, memory: str) -> nn.Module:
    """Switch a model's sparse-stored Linears between dense weights in memory (same speed) and packed
    values + indices (less memory, slower decode); the saved recipe follows, so a reload does the same."""
    if memory not in MEMORY:
        raise LeanformerError(f"memory must be 'dense' or 'sparse', got {memory!r}")
    stages = getattr(model, "config", {}).get("leanformer", {}).get("recipe", {}).get("stages", [])
    found = [s for s in stages if s.get("type") == "SparseStorage"]
    if not found:
        raise LeanformerError("this model has no SparseStorage stage; apply one (after pruning) first")
    with torch.no_grad():
        for s in found:
            for n, c in s["capacity"].items():
                m = model.get_submodule(n)
                if memory == "sparse" and not isinstance(m, SparseLinear):
                    _empty(m, c, "sparse")  # the checks (int8 stays dense) before any swap
                    set_module(model, n, SparseLinear.from_dense(m, c))
                elif memory == "dense" and isinstance(m, SparseLinear):
                    lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
                    lin.weight = nn.Parameter(m.dense_weight(), requires_grad=False)
                    lin.bias = m.bias
                    new = _empty(lin, c, "dense")
                    new._pack_for_prefill()
                    set_module(model, n, new)
            s["memory"] = memory
    return model
