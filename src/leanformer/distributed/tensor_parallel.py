"""Tensor parallel for a built Llama-family model (models/llama.py) or GPT-2 (models/gpt2.py) over
torch.distributed.

Megatron-style, two all-reduces per layer, nothing in models/ knows about it:

- attention is split by KV-head groups: rank r keeps kv heads [r*kv/N, (r+1)*kv/N) and the q heads
  that attend to them (GQA maps q head i to kv head i // (H/kv), so both are contiguous chunks):
  its rows of qkv_proj and its columns of o_proj. Its KV cache then holds only kv/N heads.
- the MLP is split by channels: rank r keeps channels [lo, hi) of gate and of up (rows of
  gate_up_proj) and the same columns of down_proj (SiLU(gate) * up is per channel, so no exchange);
  GPT-2: rows [lo, hi) of c_fc (with its bias) and columns of c_proj (GELU is per channel too).
- o_proj and down_proj / c_proj become `AllReduceLinear`: the local partial product [B, T, hidden]
  is summed over the ranks, then the bias is added once. GPT-2 has one head per KV head (MHA), so
  its attention splits by heads; its learned positions and LayerNorms stay replicated.

Embedding, norms and the LM head stay replicated, so every rank holds the same logits and samples
the same token: no broadcast of tokens is needed (sampling with a temperature needs the same seed on
every rank; the CLI broadcasts one).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from leanformer.distributed.quant_shards import column_unit, is_quantized, quant_cols, quant_rows
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import FastLinear


class AllReduceLinear(nn.Module):
    """A row-parallel Linear: y = all_reduce_sum(x_local @ W_local^T) + bias (the bias added once)."""

    def __init__(self, linear: nn.Linear, bias: torch.Tensor | None, group) -> None:
        super().__init__()
        self.linear = linear  # no bias: each rank's product is a partial sum
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # [B, T, hidden], this rank's share of the sum
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear owning copies of `weight` [out, in] / `bias` [out] (the full tensors can then be freed)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=False)
    # the GEMV kernel for decode-sized inputs, as loading gives unsharded models
    return FastLinear.from_linear(lin) if lin.weight.dtype == torch.float32 else lin


def _rows(linear: nn.Module, spans: list[tuple[int, int]]) -> nn.Module:
    """Output rows [a, b) of every span, concatenated (a column-parallel shard)."""
    if is_quantized(linear):
        return quant_rows(linear, spans)
    bias = linear.bias
    w = torch.cat([linear.weight[a:b] for a, b in spans])
    return _linear(w, None if bias is None else torch.cat([bias[a:b] for a, b in spans]))


def _cols(linear: nn.Module, lo: int, hi: int, group) -> AllReduceLinear:
    """Input columns [lo, hi) (a row-parallel shard) followed by the all-reduce."""
    bias = None if linear.bias is None else linear.bias.detach().clone()
    if is_quantized(linear):
        return AllReduceLinear(quant_cols(linear, lo, hi), bias, group)
    return AllReduceLinear(_linear(linear.weight[:, lo:hi], None), bias, group)


def _share(n: int, rank: int, size: int, unit: int = 1) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items, cut in whole units (quantization groups) but the last;
    the first ranks get one unit more when they do not divide evenly."""
    base, extra = divmod(-(-n // unit), size)
    lo = (rank * base + min(rank, extra)) * unit
    return min(lo, n), min(lo + (base + (rank < extra)) * unit, n)


def check_tp(n_kv_heads: int, size: int, name: str = "tensor parallel size") -> None:
    """One-line error unless `size` divides the KV heads (each rank must own whole KV-head groups)."""
    if size < 1 or n_kv_heads % size:
        allowed = ", ".join(str(d) for d in range(1, n_kv_heads + 1) if n_kv_heads % d == 0)
        raise LeanformerError(
            f"{name} {size} does not divide this model's {n_kv_heads} KV heads; allowed: {allowed}"
        )


# the projections parallelize_ slices (Llama: *_proj; GPT-2: c_fc, c_proj as well as qkv / o)
_SHARDED = ("_proj", "c_fc", "c_proj")


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: model.model.layers (Llama family) or model.transformer.h (GPT-2)."""
    return model.transformer.h if getattr(model, "family", None) == "gpt2" else model.model.layers


def _check_linears(model: nn.Module) -> None:
    for name, module in blocks_of(model).named_modules():
        if name.endswith(_SHARDED) and not (isinstance(module, nn.Linear) or is_quantized(module)):
            raise LeanformerError(
                f"tensor parallel shards float, int8 and int4 Linears; {name} is a {type(module).__name__}"
            )


def check_splittable(model: nn.Module, kind: str, families: tuple[str, ...] = ("llama",)) -> None:
    """One-line errors before any split: no process group, not a family in `families`, already split."""
    if not dist.is_available() or not dist.is_initialized():
        raise LeanformerError(
            f"{kind} needs a process group: run under torchrun and call "
            "torch.distributed.init_process_group first"
        )
    family = getattr(model, "family", None)
    if family not in families or not hasattr(model, "transformer" if family == "gpt2" else "model"):
        names = "the Llama family (Llama, Mistral, Qwen2, SmolLM)" + (
            " and GPT-2" if "gpt2" in families else ""
        )
        raise LeanformerError(
            f"{kind} supports {names}; this model is {getattr(model, 'family', type(model).__name__)!r}"
        )
    if getattr(model, "tp", None) is not None or getattr(model, "pp", None) is not None:
        raise LeanformerError("this model is already split (parallelize_ / pipeline_ ran); load it again")
    if getattr(getattr(model, "args", None), "num_attention_heads_per_layer", None):
        raise LeanformerError(
            f"{kind} needs the same attention-head count in every layer; this model was head-pruned unevenly "
            "(num_attention_heads_per_layer in its config): run it in one process"
        )


def parallelize_(model: nn.Module, group=None) -> nn.Module:
    """Shard a built Llama-family or GPT-2 model in place over `group` (default: the whole world); returns it.

    Every rank of the group must call this on the same model. Afterwards `model.args` reports this
    rank's head counts (so KVCache.for_model sizes the cache [slots, kv/N, seq, head_dim]) and
    `model.tp = (rank, size)`. The fused C++ decode step is turned off: it runs every layer in one
    call and has no place for the all-reduces; decode takes the module path.
    """
    check_splittable(model, "tensor parallel", ("llama", "gpt2"))
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    a = model.args
    check_tp(a.num_key_value_heads, size)
    _check_linears(model)
    h, kv, d = a.num_attention_heads // size, a.num_key_value_heads // size, a.head_dim
    q_rows = (rank * h * d, (rank + 1) * h * d)  # qkv_proj rows: q [H*d] | k [KV*d] | v [KV*d]
    k0 = a.num_attention_heads * d
    k_rows = (k0 + rank * kv * d, k0 + (rank + 1) * kv * d)
    v0 = k0 + a.num_key_value_heads * d
    v_rows = (v0 + rank * kv * d, v0 + (rank + 1) * kv * d)
    with torch.no_grad():
        for block in blocks_of(model):
            attn, mlp = getattr(block, "self_attn", None) or block.attn, block.mlp
            attn.qkv_proj = _rows(attn.qkv_proj, [q_rows, k_rows, v_rows])
            attn.o_proj = _cols(attn.o_proj, *q_rows, group)  # o_proj's inputs are the q heads' outputs
            attn.n_heads, attn.n_kv_heads = h, kv
            if model.family == "gpt2":
                lo, hi = _share(mlp.c_fc.out_features, rank, size, column_unit(mlp.c_proj))
                mlp.c_fc, mlp.c_proj = _rows(mlp.c_fc, [(lo, hi)]), _cols(mlp.c_proj, lo, hi, group)
                continue
            lo, hi = _share(mlp.inter, rank, size, column_unit(mlp.down_proj))
            # gate_up_proj rows: gate [inter] | up [inter]
            mlp.gate_up_proj = _rows(mlp.gate_up_proj, [(lo, hi), (mlp.inter + lo, mlp.inter + hi)])
            mlp.down_proj = _cols(mlp.down_proj, lo, hi, group)
            mlp.inter = hi - lo
    # GPT-2's args derive the KV heads from the heads (a property, not a field)
    local = {"num_attention_heads": h} | ({"num_key_value_heads": kv} if model.family == "llama" else {})
    model.args = dataclasses.replace(a, **local)
    model.fused_decode = False
    model.tp = (rank, size)
    return model
