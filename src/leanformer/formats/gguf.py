"""GGUF (llama.cpp) checkpoints → HF-style config, HF-named state dict and a transformers tokenizer.

gguf_index.py reads the file's metadata and tensor table (the `gguf` package's reader took ~2 s to open a
49k-token vocabulary); the `gguf` package dequantizes. This module owns only what is specific to us:
GGUF tensor names → HF names, GGUF metadata → HF config keys, and undoing llama.cpp's q/k permutation.

llama.cpp runs the `llama` architecture with interleaved-pair RoPE, so its converter permutes the rows of
HF's q_proj/k_proj (rotate_half layout) inside each head. Our models use HF's rotate_half RoPE, so we
permute the rows back. That is a pure row permutation, and GGML blocks run along rows, so it applies to
the quantized bytes as well: `read_gguf_raw` hands out HF-layout rows without dequantizing anything.
`qwen2` files are not permuted (llama.cpp runs them with NeoX-style RoPE, which is rotate_half).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanformer.errors import LeanformerError
from leanformer.formats.gguf_index import GGUFIndex
from leanformer.formats.hf_weights import first_line

# GGUF architecture → (HF architectures name, HF model_type, q/k rows permuted by llama.cpp's converter)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),  # also Mistral and SmolLM, which llama.cpp files as llama
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED_TENSORS = {"rope_freqs.weight"}  # turned into config["rope_scaling"] instead


@dataclass
class GGUFTensor:
    """One tensor as stored in the file, with its HF name and rows already in HF order.

    `data` is the file's memory-mapped bytes (it keeps the file mapped; copy it to drop the mapping):
    - float types (F32, F16, BF16 as uint16): an array of `shape`;
    - block-quantized types: uint8 `[rows, bytes_per_row]`, where rows are the output channels (all dims
      but the last) and each row is a run of blocks along the input dimension. `unpack_blocks` splits
      Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K rows into scales and integer codes for int modules.
    """

    name: str
    ggml_type: str  # a gguf.GGMLQuantizationType name: "F32", "Q8_0", "Q4_K", ...
    shape: tuple[int, ...]  # logical shape in torch order, e.g. [out_features, in_features]
    data: np.ndarray

    def dequantize(self) -> torch.Tensor:
        """A float32 torch tensor of `shape`, owning its memory (the file mapping is not kept)."""
        import gguf

        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        try:
            values = gguf.quants.dequantize(self.data, qtype)
        except NotImplementedError as e:
            raise LeanformerError(
                f"{self.name}: GGUF type {self.ggml_type} cannot be dequantized ({e})"
            ) from e
        values = np.asarray(values, dtype=np.float32).reshape(self.shape)
        if not values.flags.writeable or np.may_share_memory(values, self.data):
            values = values.copy()  # never hand out a view of the read-only file mapping
        return torch.from_numpy(values)


# Block layouts of the types `unpack_blocks` splits (fp16 little-endian; q unsigned unless said):
#   Q8_0  34 B / 32 cols: d, int8 q[32]                                            w = d * q
#   Q4_0  18 B / 32 cols: d, qs[16]: col j is the low nibble of qs[j], col j + 16 the high one
#                                                                                  w = d * (q - 8)
#   Q4_1  20 B / 32 cols: d, m, qs[16] as Q4_0                                     w = d * q + m
#   Q5_0  22 B / 32 cols: d, qh u32 (bit j: 5th bit of col j), qs[16] as Q4_0     w = d * (q - 16)
#   Q4_K 144 B / 256 cols: d, dmin, 12 B of 6-bit (sc_j, m_j) for 8 sub-blocks of 32 cols, qs[128]
#        as 4 runs of 32 B: run r's low nibbles are sub-block 2r, its high nibbles 2r + 1
#                                                                                  w = (d sc_j) q - dmin m_j
#   Q6_K 210 B / 256 cols: ql[128], qh[64], int8 sc[16] (one per 16 cols), d. In half h (128 cols;
#        ql[64h:], qh[32h:]) col 32 i + l (i < 4, l < 32) takes nibble i // 2 of ql[32 (i % 2) + l]
#        and bits 2i, 2i + 1 of qh[l] as its top two bits                          w = (d sc_g) (q - 32)
UNPACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
CODE_OFFSET = {"Q8_0": 0, "Q4_0": 8, "Q4_1": 0, "Q5_0": 16, "Q4_K": 0, "Q6_K": 32}  # w = scale (q - off)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> float16 [...]."""
    return b.copy().view(np.float16)[..., 0]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] codes: the n low nibbles, then the n high ones."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes [..., 12] -> 6-bit sc, m [..., 8]. Bytes 0-3: sc 0-3 (low 6 bits), 4-7:
    m 0-3; bytes 8-11 hold the low nibbles of sc 4-7 and, high nibbles, of m 4-7, whose top 2 bits are
    the spare top bits of bytes 0-3 (sc) and 4-7 (m)."""
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, m


def unpack_blocks(tensor: GGUFTensor) -> dict[str, np.ndarray]:
    """Split block-quantized rows into integer codes and per-group scales, for int8 / int4 modules.

    Returns `q` [rows, cols] in natural column order (Q8_0: int8; others: uint8 unsigned codes) and
    `scale` [rows, groups] (float16 for 32-column types; for K-types the exact fp32 product d * sc of
    the fp16 d and the integer sub-block scale). Q4_1 and Q4_K also give `min` [rows, groups] (Q4_1:
    fp16 m; Q4_K: fp32 -(dmin * m_j), exact). Dequantized value: `scale * (q - CODE_OFFSET[type])`,
    plus `min` when present. Groups: 16 columns for Q6_K, 32 otherwise (see the layouts above).
    """
    rows, kind = tensor.data.shape[0], tensor.ggml_type
    if kind == "Q8_0":
        blocks = tensor.data.reshape(rows, -1, 34)
        return {"scale": _f16(blocks[..., :2]), "q": blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)}
    if kind in ("Q4_0", "Q4_1", "Q5_0"):
        head = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6}[kind]
        blocks = tensor.data.reshape(rows, -1, head + 16)
        q = _nibbles(blocks[..., head:])  # [rows, blocks, 32]
        out = {"scale": _f16(blocks[..., :2])}
        if kind == "Q4_1":
            out["min"] = _f16(blocks[..., 2:4])
        if kind == "Q5_0":  # qh's 32 bits, little-endian: bit j -> 16 for col j
            q |= np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little") << 4
        return out | {"q": q.reshape(rows, -1)}
    if kind == "Q4_K":
        blocks = tensor.data.reshape(rows, -1, 144)
        d, dmin = _f16(blocks[..., 0:2]).astype(np.float32), _f16(blocks[..., 2:4]).astype(np.float32)
        sc, m = _k_scales_mins(blocks[..., 4:16])
        q = _nibbles(blocks[..., 16:].reshape(rows, -1, 4, 32))  # [rows, blocks, run, 64]
        # 11-bit fp16 significands times 6-bit integers: both products are exact in fp32
        scale = d[..., None] * sc.astype(np.float32)
        low = -(dmin[..., None] * m.astype(np.float32))
        return {"scale": scale.reshape(rows, -1), "min": low.reshape(rows, -1), "q": q.reshape(rows, -1)}
    if kind == "Q6_K":
        blocks = tensor.data.reshape(rows, -1, 210)
        ql = _nibbles(blocks[..., :128].reshape(rows, -1, 2, 64))  # [rows, blocks, half, 128]
        qh = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        q = ql | ((qh & 3).reshape(ql.shape) << 4)
        sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # [rows, blocks, 16]
        scale = _f16(blocks[..., 208:210]).astype(np.float32)[..., None] * sc  # 11 x 8 bits: exact
        return {"scale": scale.reshape(rows, -1), "q": q.reshape(rows, -1)}
    raise LeanformerError(
        f"{tensor.name}: unpack_blocks handles {', '.join(UNPACKED_TYPES)}, not {tensor.ggml_type}"
    )


def _open(path: Path) -> GGUFIndex:
    """The file's metadata and tensor table (gguf_index.py), every parse failure as one readable line."""
    if not path.is_file():
        raise LeanformerError(f"{path}: no such GGUF file")
    try:
        return GGUFIndex(path)
    except Exception as e:  # ValueError, struct / numpy / unicode errors, ... on bad files
        raise LeanformerError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e


def _metadata(reader: GGUFIndex, skip_arrays_over: int = 64) -> dict[str, Any]:
    """Scalar and short-array metadata; the tokenizer's huge arrays are left for transformers to read."""
    return {
        key: value
        for key, value in reader.fields.items()
        if not (isinstance(value, list) and len(value) > skip_arrays_over)
    }


def _tidy_float(value: float) -> float:
    """GGUF stores float32; 9.999999747378752e-06 goes back to the 1e-05 the original config said."""
    return float(str(np.float32(value)))


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        mapped = _BLOCK_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_LEVEL_NAMES.get(stem)
    return f"{mapped}.{suffix}" if mapped else None


def interleaved_to_half_rows(rows: int, n_heads: int) -> np.ndarray:
    """Row index that takes q/k rows laid out for interleaved-pair RoPE to HF's rotate_half layout.

    Within a head of size d, the interleaved layout (llama.cpp's converter, llama2.c's export) keeps HF
    row `s * d/2 + j` (s = which half, j = pair index) at row `2j + s`; `w_hf = w[index]`.
    """
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover Llama-3.1-style `rope_scaling` from the `rope_freqs` divisors llama.cpp writes instead.

    llama.cpp stores the per-frequency divisor, not the parameters. We fit the parameters every Llama 3.x
    release used (low 1, high 4, original context 8192; factor = largest divisor) and check that they
    reproduce the stored divisors, rather than guessing silently.
    """
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / factor + smooth)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise LeanformerError("GGUF rope_freqs tensor does not match Llama 3 RoPE scaling; not supported")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """HF config keys (as transformers' LlamaConfig / Qwen2Config spell them) from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LeanformerError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hf_arch, model_type, _ = SUPPORTED_ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LeanformerError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise LeanformerError(f"GGUF {arch}.{key} varies per layer; not supported")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise LeanformerError("GGUF model applies RoPE to part of each head; not supported")
    if "token_embd.weight" not in tensors:
        raise LeanformerError("GGUF file has no token_embd.weight tensor")
    theta = float(get("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "rms_norm_eps": _tidy_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _tidy_float(theta),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor"))}
        if scaling == "yarn":
            original = get("rope.scaling.original_context_length")
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif scaling not in (None, "none"):
        raise LeanformerError(f"GGUF RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32).reshape(-1)
        config["rope_scaling"] = _llama3_rope_scaling(factors, head_dim, theta)
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def drop_file_pages(raw: dict[str, GGUFTensor]) -> None:
    """Let the kernel drop the file pages read so far from this process's resident set (they stay in
    the page cache): otherwise the whole file (read once, never again) adds to the loading peak."""
    import mmap

    m = next((mm for t in raw.values() if (mm := getattr(t.data, "_mmap", None)) is not None), None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # best effort: e.g. a map closed meanwhile
            m.madvise(mmap.MADV_DONTNEED)


def read_gguf_raw(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The config and every weight *as stored* (no dequantization), under HF names, rows in HF order.

    For loading block-quantized weights straight into int8 / int4 modules (see `unpack_blocks`), or
    dequantizing lazily one tensor at a time with `GGUFTensor.dequantize`.
    """
    path = Path(path)
    reader = _open(path)
    try:
        return _read_raw(path, reader)
    except (KeyError, TypeError, ValueError, IndexError) as e:  # metadata of the wrong type, odd shapes
        raise LeanformerError(f"{path}: malformed GGUF metadata or tensor info ({first_line(e)})") from None


def _read_raw(path: Path, reader: GGUFIndex) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    meta = _metadata(reader)
    by_gguf_name = {t.name: t for t in reader.tensors}
    config = _config(meta, by_gguf_name)
    permuted = SUPPORTED_ARCHITECTURES[meta["general.architecture"]][2]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    out: dict[str, GGUFTensor] = {}
    for gguf_name, t in by_gguf_name.items():
        name = _hf_name(gguf_name)
        if name is None:
            if gguf_name not in _IGNORED_TENSORS:
                warnings.warn(f"{path.name}: ignoring unknown GGUF tensor {gguf_name}", stacklevel=2)
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGML lists dims fastest first
        data = t.data
        part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if permuted and part in heads:
            data = data[interleaved_to_half_rows(shape[0], heads[part])]
        out[name] = GGUFTensor(name=name, ggml_type=t.tensor_type.name, shape=shape, data=data)
    return config, out


def load_gguf_tokenizer(path: str | Path) -> Any | None:
    """transformers' own GGUF tokenizer (a PreTrainedTokenizerFast), chat template included.

    `PreTrainedTokenizerFast.from_pretrained(gguf_file=...)` builds the same tokenizer as AutoTokenizer
    (checked for BPE and sentencepiece vocabularies) ~10x faster, as it skips re-parsing the whole file
    for a model config; AutoTokenizer is the fallback. Returns None (with a warning) when transformers
    cannot build one for this file: the weights are still usable with a tokenizer of the caller's own.
    """
    path = Path(path).resolve()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = None
    errors = []
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        try:
            tok = cls.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            break
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    if tok is None:
        warnings.warn(f"{path.name}: no tokenizer from GGUF metadata ({errors[-1]})", stacklevel=2)
        return None
    if not getattr(tok, "chat_template", None):
        template = _open(path).fields.get("tokenizer.chat_template")
        if isinstance(template, str):
            tok.chat_template = template
    return tok


def read_gguf(
    path: str | Path, with_tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any | None]:
    """Config, float32 state dict (HF names, HF row order) and tokenizer of a llama / qwen2 GGUF file.

    Every weight is dequantized with `gguf.quants.dequantize`; `lm_head.weight` is present only when the
    file has its own output matrix (otherwise `config["tie_word_embeddings"]` is True).
    """
    config, raw = read_gguf_raw(path)
    state_dict = {name: t.dequantize() for name, t in raw.items()}
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return config, state_dict, tokenizer
