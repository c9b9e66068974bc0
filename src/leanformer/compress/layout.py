"""Quantized modules placed by a per-module map instead of a recipe (GGUF files loaded with
`keep_quantized=True`), and the token embedding that reads a quantized table.

The map, saved as config["leanformer"]["quantized_modules"], names each module's kind:
    {"model.layers.0.self_attn.qkv_proj": {"type": "Int4Linear", "group_size": 32},
     "lm_head": {"type": "Int8Linear", "group_size": 32},
     "model.embed_tokens": {"type": "QuantEmbedding", "tied_to": "lm_head"}}
`restore_layout_` swaps those modules in on a (meta) model so a state dict in our names loads into it,
exactly like a recipe's structure_only pass.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress.half import HALF_LINEARS
from leanformer.compress.int4 import Int4Linear
from leanformer.compress.int5 import Int5Linear
from leanformer.compress.int8 import Int8Linear
from leanformer.compress.qbase import QuantLinear, set_module
from leanformer.errors import LeanformerError

LAYOUT_KEY = "quantized_modules"


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantized [vocab, hidden] table: only the looked-up rows are dequantized
    (fp32 math, rounded once to the model's dtype), so the table stays at 4 or 8 bits plus scales.

    Tied (the LM head is the same matrix, as in GGUF files without output.weight): the table is the
    head module, referenced but not registered, so its tensors appear once in the state dict (under
    the head). Untied: the table is a registered child, `table`."""

    def __init__(self, table: QuantLinear, tied: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        if table.input_scale is not None:
            raise LeanformerError("a quantized embedding table cannot carry an AWQ input scale")
        self.tied = tied
        if tied:
            object.__setattr__(self, "_table", table)  # plain attribute: not a submodule
        else:
            self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # Output dtype; follows model.to(dtype / device) like a parameter would. Created on CPU
        # explicitly: a model built under torch.device("meta") must still be movable.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device="cpu"), persistent=False)

    def source(self) -> QuantLinear:
        return self._table if self.tied else self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.source().dequantize_as(ids.reshape(-1), self._dtype_probe.dtype)  # [n, hidden]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        table = type(self.source()).__name__
        return f"{self.num_embeddings}, {self.embedding_dim}, table={table}, tied={self.tied}"


def _empty_linear(spec: dict, in_features: int, out_features: int, bias: bool, device, dtype) -> QuantLinear:
    kind = spec.get("type")
    if kind == "Int4Linear":
        symmetric = spec.get("symmetric", False)  # GGUF Q4_0: no zeros buffer
        return Int4Linear(
            in_features, out_features, spec["group_size"], bias, device, dtype, symmetric=symmetric
        )
    if kind == "Int5Linear":
        return Int5Linear(in_features, out_features, spec["group_size"], bias, device, dtype)
    if kind == "Int8Linear":
        return Int8Linear(in_features, out_features, bias, device, dtype, spec.get("group_size"))
    if kind in HALF_LINEARS:
        return HALF_LINEARS[kind](in_features, out_features, bias, device, dtype)
    raise LeanformerError(f"unknown quantized module type {kind!r} in {LAYOUT_KEY}")


def restore_layout_(
    model: nn.Module, layout: dict[str, dict], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Swap in empty quantized modules per `layout` (Linears first: a tied embedding needs its head);
    `dtype`: the model's float dtype, which embeddings emit."""
    embeddings = {n: s for n, s in layout.items() if s.get("type") == "QuantEmbedding"}
    for name, spec in layout.items():
        if name in embeddings:
            continue
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise LeanformerError(f"{LAYOUT_KEY}: {name} is a {type(lin).__name__}, not a Linear")
        w = lin.weight
        set_module(
            model,
            name,
            _empty_linear(spec, lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype),
        )
    for name, spec in embeddings.items():
        emb = model.get_submodule(name)
        if spec.get("tied_to"):
            table = model.get_submodule(spec["tied_to"])
            if not isinstance(table, QuantLinear):
                raise LeanformerError(f"{LAYOUT_KEY}: {name} is tied to {spec['tied_to']}, not quantized")
            set_module(model, name, QuantEmbedding(table, tied=True, dtype=dtype))
        else:
            w = emb.weight
            table = _empty_linear(
                spec["table"], emb.embedding_dim, emb.num_embeddings, False, w.device, w.dtype
            )
            set_module(model, name, QuantEmbedding(table, tied=False, dtype=dtype))
    return model


def exact_state_names(model: nn.Module) -> set[str]:
    """State-dict names of quantized modules' fp32 buffers (scales, zeros, input scales): a loader must
    not cast these to the model dtype (bf16 would round GGUF's exact fp16 / fp32 scales)."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, QuantLinear):
            names.update(f"{prefix}.{b}" if prefix else b for b in (*m.EXACT, *m.KEEP_DTYPE))
    return names
