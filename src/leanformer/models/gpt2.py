"""GPT-2: learned positions, LayerNorm, GELU(tanh) MLP, tied LM head.

HF stores GPT-2's projections as Conv1D ([in, out] weights); `sanitize` transposes them once so
every projection here is a plain nn.Linear (the same kernels, quantization and pruning apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.models.kv_cache import KVCache
from leanformer.models.layers import Attention, embedding

ARCHITECTURES = ("GPT2LMHeadModel",)


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    # hidden_size // num_attention_heads unless given: a tensor-parallel shard reports its own head
    # count (distributed/tensor_parallel.py) and must keep the head width
    head_dim: int = 0

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        hidden = cfg["n_embd"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            num_hidden_layers=cfg["n_layer"],
            num_attention_heads=cfg["n_head"],
            max_position_embeddings=cfg["n_positions"],
            layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        )


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(hidden, inter)
        self.c_proj = nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, idx: int) -> None:
        super().__init__()
        h = a.num_attention_heads
        self.ln_1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.attn = Attention(a.hidden_size, h, h, a.head_dim, qkv_bias=True, o_bias=True, layer_idx=idx)
        self.ln_2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = MLP(a.hidden_size, a.intermediate_size)

    def forward(self, x, cache, step):
        x = x + self.attn(self.ln_1(x), None, cache, step)
        return x + self.mlp(self.ln_2(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.wte = embedding(a.vocab_size, a.hidden_size)
        self.wpe = embedding(a.max_position_embeddings, a.hidden_size)
        self.h = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.ln_f = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.transformer = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] → logits [B, T, vocab]; with logits_at [B] only at those positions: [B, 1, vocab].

        Scoring only the positions that are sampled matters: the LM head is the largest matmul.
        """
        b, t = input_ids.shape
        step = None
        if cache is None:
            positions = torch.arange(t, device=input_ids.device)
        else:
            step = cache.begin(torch.arange(b) if slots is None else slots, t)
            positions = step.positions
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, cache, step)
        if logits_at is not None:
            x = x[torch.arange(b), logits_at.to(x.device)][:, None]
        return self.lm_head(self.transformer.ln_f(x))


_RENAMES = {"attn.c_attn.": "attn.qkv_proj.", "attn.c_proj.": "attn.o_proj."}


def sanitize(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF GPT-2 names → ours: add the `transformer.` prefix if missing, Conv1D → Linear, drop buffers."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        is_conv1d = any(k in name for k in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        if is_conv1d and "lm_head" not in name:
            tensor = tensor.t().contiguous()
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out
