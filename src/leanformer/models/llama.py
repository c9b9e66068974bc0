"""Llama family decoder: Llama 2/3, Mistral, Qwen2, SmolLM — one definition, differences are flags.

Parameter names follow HF except two fusions done by `sanitize`: q/k/v → `self_attn.qkv_proj` and
gate/up → `mlp.gate_up_proj`, because one matmul instead of two or three is what decode speed on a
CPU is made of (fewer, larger, memory-bound calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.models.fused import DecodePlan, set_head_activations
from leanformer.models.kv_cache import KVCache
from leanformer.models.layers import Attention, RMSNorm, Rotary, embedding

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # per-layer FFN widths after structured pruning (compress/structured.py); None: all intermediate_size
    intermediate_sizes: list[int] | None = None
    # per-layer query-head counts after head pruning (compress/prune_heads.py), each a multiple of
    # num_key_value_heads (same for every layer: the KV cache has one shape); None: all num_attention_heads
    num_attention_heads_per_layer: list[int] | None = None

    def ffn_width(self, idx: int) -> int:
        return self.intermediate_sizes[idx] if self.intermediate_sizes else self.intermediate_size

    def heads(self, idx: int) -> int:
        """Query heads of layer idx."""
        per = self.num_attention_heads_per_layer
        return per[idx] if per else self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        heads = cfg["num_attention_heads"]
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        # transformers >= 5 folds rope_theta/rope_scaling into rope_parameters.
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        is_qwen2 = arch == "Qwen2ForCausalLM" or cfg.get("model_type") == "qwen2"
        sizes = cfg.get("intermediate_sizes")
        if sizes is not None and (
            not isinstance(sizes, list)
            or len(sizes) != cfg["num_hidden_layers"]
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
        ):
            raise ValueError("intermediate_sizes must list one positive width per layer")
        kv = cfg.get("num_key_value_heads") or heads
        per_layer = cfg.get("num_attention_heads_per_layer")
        if per_layer is not None and (
            not isinstance(per_layer, list)
            or len(per_layer) != cfg["num_hidden_layers"]
            or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 and n % kv == 0 for n in per_layer
            )
        ):
            raise ValueError(
                f"num_attention_heads_per_layer must list one head count per layer, each a positive multiple of "
                f"num_key_value_heads ({kv})"
            )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or cfg.get("attention_bias", False),
            o_bias=(not is_qwen2) and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            intermediate_sizes=sizes,
            num_attention_heads_per_layer=per_layer,
        )


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(
            a.hidden_size, a.heads(idx), a.num_key_value_heads, a.head_dim, a.qkv_bias, a.o_bias, idx
        )
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a.hidden_size, a.ffn_width(idx), a.mlp_bias)

    def forward(self, x, rope, cache, step):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args.head_dim, args.rope_theta, args.rope_scaling)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # decode steps (one new token per row, CPU fp32) run all layers in one C++ call (fused.py);
        # False keeps the module path (for comparisons)
        self.fused_decode = True
        self._decode_plan = DecodePlan()

    def _apply(self, fn, recurse=True):
        self._decode_plan.reset()  # .to() / .float() / ... replace tensor data under the same Parameters
        return super()._apply(fn, recurse)

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
            slots = torch.arange(b) if slots is None else slots
            step = cache.begin(slots, t)
            # a KV policy that evicted tokens keeps their true RoPE positions (models/kv_policy.py)
            positions = step.positions if step.rope_positions is None else step.rope_positions
        if cache is not None and DecodePlan.usable_tokens(self, input_ids, cache):
            # one new token per row: ids to logits in one C++ call where the stack holds the embedding,
            # final norm and head too (fused.py run_tokens; one row's logits, so logits_at changes nothing)
            logits = self._decode_plan.run_tokens(
                self, input_ids, self.rotary(positions, torch.float32), cache, step
            )
            if logits is not None:
                return logits
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        fused = None
        if cache is not None and DecodePlan.usable(self, x, cache):
            fused = self._decode_plan.run(self, x, rope, cache, step)
        if fused is not None:
            x = fused
            keep = getattr(cache, "logit_rows", None)  # a chained prefill wants a few rows' logits only
            if keep is not None:
                x = x[keep.to(x.device)]
        else:
            for layer in self.model.layers:
                x = layer(x, rope, cache, step)
        if logits_at is not None:
            x = x[torch.arange(b), logits_at.to(x.device)][:, None]
        set_head_activations(self, fused is not None)
        return self.lm_head(self.model.norm(x))


def sanitize(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF names → ours: fuse q/k/v and gate/up, drop tied/rotary extras."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if "rotary_emb" in name:
            continue
        out[name] = tensor
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"]
            if all(k in out for k in qkv):
                out[p + f"self_attn.qkv_proj.{kind}"] = torch.cat([out.pop(k) for k in qkv])
            gu = [p + f"mlp.{n}_proj.{kind}" for n in ("gate", "up")]
            if all(k in out for k in gu):
                out[p + f"mlp.gate_up_proj.{kind}"] = torch.cat([out.pop(k) for k in gu])
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
