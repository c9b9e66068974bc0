"""Test helper: write small Llama / Qwen2 GGUF files the way llama.cpp's converter does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate_half q/k rows → interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny sentencepiece-style vocabulary: specials, 256 byte tokens, letters and a few merges."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = (
        ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁t", "he", "▁the", "▁c", "at", "▁cat"]
    )
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    return tokens, scores, types


def hf_llama_state_dict(cfg: dict, seed: int = 0, bias: bool = False) -> dict[str, torch.Tensor]:
    """Random HF-named Llama weights for `cfg` (untied lm_head when cfg says so)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, heads, kv = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    hd = h // heads

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"model.embed_tokens.weight": r(cfg["vocab_size"], h), "model.norm.weight": 1 + r(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + r(h),
            p + "self_attn.q_proj.weight": r(heads * hd, h),
            p + "self_attn.k_proj.weight": r(kv * hd, h),
            p + "self_attn.v_proj.weight": r(kv * hd, h),
            p + "self_attn.o_proj.weight": r(h, heads * hd),
            p + "post_attention_layernorm.weight": 1 + r(h),
            p + "mlp.gate_proj.weight": r(inter, h),
            p + "mlp.up_proj.weight": r(inter, h),
            p + "mlp.down_proj.weight": r(h, inter),
        }
        if bias:
            sd |= {p + f"self_attn.{x}_proj.bias": r(n * hd) for x, n in (("q", heads), ("k", kv), ("v", kv))}
    if not cfg.get("tie_word_embeddings", True):
        sd["lm_head.weight"] = r(cfg["vocab_size"], h)
    return sd


def write_gguf(
    path: Path,
    cfg: dict,
    sd: dict[str, torch.Tensor],
    arch: str = "llama",
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
    chat_template: str | None = None,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """Write `sd` as llama.cpp would: GGUF names, q/k permuted for `llama`, chosen tensors quantized.

    `qtypes` maps a substring of the HF name to a GGML type (first match wins); others stay F32.
    `extra(writer)` may add more metadata or tensors before the file is written.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    tokens, scores, types = spm_vocab()
    assert len(tokens) == cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, tensor in sd.items():
        stem, suffix = name.rsplit(".", 1)
        if stem in TOP_NAMES:
            gguf_name = f"{TOP_NAMES[stem]}.{suffix}"
        else:
            _, _, layer, part = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[part]}.{suffix}"
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            data = llamacpp_permute(data, heads)
        qtype = next((q for key, q in (qtypes or {}).items() if key in name), None)
        if qtype is None or data.ndim == 1:
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
