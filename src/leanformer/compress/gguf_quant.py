"""GGUF block-quantized weights straight into int8 / int4 modules: `load(path, keep_quantized=True)`.

No full-precision copy of the model is made: each tensor's blocks are split into codes and scales
(`unpack_blocks`, one tensor at a time) and repacked in our module layout. The mappings are exact
(GGML blocks are 32 columns of one row; d and m are fp16 in the file):
- Q4_0, w = d * (q - 8)  -> Int4Linear group 32: scale = d, zero = 0.
- Q4_1, w = d * q + m    -> Int4Linear group 32: scale = d, zero = m + 8 d in fp32. (q - 8) * d is exact
  in fp32, and so is m + 8 d unless the two fp16 values are more than 2^13 apart in magnitude, so
  (q - 8) * d + zero rounds once, like d * q + m: the weights are bit-identical to gguf's dequantized
  ones (checked for every matrix of SmolLM2-135M's Q4_1 file).
- Q8_0, w = d * q        -> Int8Linear with one scale per 32 columns (the GEMV kernel reads them).
Fused modules (qkv_proj = q|k|v, gate_up_proj = gate|up, as models/llama.sanitize fuses) keep that
form when their parts agree: all Q4_0/Q4_1 -> int4; Q8_0 with Q4_0 -> int8 (Q4_0 is int8 q - 8 with
the same d). Anything else (F32/F16 tensors, other GGML types such as Q4_K / Q6_K, Q4_1 mixed with
Q8_0) becomes an ordinary float Linear, dequantized one tensor at a time. A quantized token embedding
becomes a QuantEmbedding: rows dequantized on lookup, and when the file ties it to the LM head (no
output.weight) the head's module is the table, so the matrix is stored once.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanformer.errors import LeanformerError
from leanformer.formats.gguf import GGUFTensor, load_gguf_tokenizer, read_gguf_raw, unpack_blocks

GROUP = 32  # GGML block width for Q4_0 / Q4_1 / Q8_0
INT4_TYPES = {"Q4_0", "Q4_1"}
INT8_TYPES = {"Q8_0", "Q4_0"}
FLOAT_TYPES = {"F32", "F16", "BF16"}
FUSED = {  # our module -> the HF modules whose rows it stacks (models/llama.py's sanitize)
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _int4(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> codes uint8 [N, K] (0..15), scales fp32 [N, K/32], zeros fp32 [N, K/32]."""
    b = unpack_blocks(t)
    d = b["scale"].astype(np.float32)
    if t.ggml_type == "Q4_0":
        zero = np.zeros_like(d)
    else:  # m + 8 d: fp32 holds it exactly unless |m| and 8 d are > 2^13 apart (see above)
        zero = (b["min"].astype(np.float64) + 8.0 * d.astype(np.float64)).astype(np.float32)
    return torch.from_numpy(b["q"]), torch.from_numpy(d), torch.from_numpy(zero)


def _int8(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> q int8 [N, K], scales fp32 [N, K/32]."""
    b = unpack_blocks(t)
    q = b["q"] if t.ggml_type == "Q8_0" else (b["q"].astype(np.int16) - 8).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(b["scale"].astype(np.float32))


def _cat(ts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Row-stack; a single part is handed over as is (no second copy of a 49152-row embedding)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def quantized_form(parts: list[GGUFTensor]) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Rows of `parts` stacked into one module: (layout spec or None for float, its weight tensors)."""
    from leanformer.compress.kernels import pack_nibbles

    kinds = {p.ggml_type for p in parts}
    if kinds <= INT4_TYPES:
        codes, scales, zeros = zip(*(_int4(p) for p in parts))
        tensors = {"qweight": pack_nibbles(_cat(codes)), "scales": _cat(scales)}
        return {"type": "Int4Linear", "group_size": GROUP}, tensors | {"zeros": _cat(zeros)}
    if kinds <= INT8_TYPES:
        q, scales = zip(*(_int8(p) for p in parts))
        spec = {"type": "Int8Linear", "group_size": GROUP}
        return spec, {"weight_int8": _cat(q), "scales": _cat(scales)}
    return None, {"weight": _cat([p.dequantize() for p in parts])}


def _drop_file_pages(raw: dict[str, GGUFTensor]) -> None:
    """Let the kernel drop the file pages read so far from this process's resident set (they stay in
    the page cache): otherwise the whole file (read once, never again) adds to the loading peak."""
    import mmap

    m = next((mm for t in raw.values() if (mm := getattr(t.data, "_mmap", None)) is not None), None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # best effort: e.g. a map closed meanwhile
            m.madvise(mmap.MADV_DONTNEED)


def read_gguf_quantized(
    path: str | Path, with_tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any | None]:
    """Config (with config["leanformer"]["quantized_modules"], the layout `loading.build` rebuilds),
    state dict in our module names (fused, quantized modules' buffers) and tokenizer."""
    from leanformer.compress.layout import LAYOUT_KEY

    config, raw = read_gguf_raw(path)
    layout: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    left = dict(raw)  # tensors not yet consumed; the rest (norms) are float
    unsupported: set[str] = set()

    def place(name: str, hf_names: tuple[str, ...], prefix: str = "") -> dict | None:
        parts = [left.pop(f"{n}.weight") for n in hf_names]
        spec, tensors = quantized_form(parts)
        unsupported.update(
            p.ggml_type for p in parts if p.ggml_type not in INT4_TYPES | INT8_TYPES | FLOAT_TYPES
        )
        state.update({f"{prefix or name}.{k}": v for k, v in tensors.items()})
        biases = [left.pop(f"{n}.bias", None) for n in hf_names]
        if any(b is not None for b in biases):
            if not all(b is not None for b in biases):
                raise LeanformerError(f"GGUF file has biases for only some of {', '.join(hf_names)}")
            state[f"{name}.bias"] = torch.cat([b.dequantize() for b in biases])
        return spec

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for ours, theirs in FUSED.items():
            spec = place(p + ours, tuple(p + t for t in theirs))
            if spec:
                layout[p + ours] = spec
        _drop_file_pages(raw)
    if "lm_head.weight" in left:  # untied head
        spec = place("lm_head", ("lm_head",))
        if spec:
            layout["lm_head"] = spec
    embed = "model.embed_tokens"
    tied = config.get("tie_word_embeddings", False)
    table = place(embed, (embed,), prefix="lm_head" if tied else f"{embed}.table")
    if table is None:  # float embedding: plain nn.Embedding (tied to a float head by loading.build)
        state[f"{embed}.weight"] = state.pop(f"{'lm_head' if tied else embed + '.table'}.weight")
    elif tied:
        layout["lm_head"] = table
        layout[embed] = {"type": "QuantEmbedding", "tied_to": "lm_head"}
    else:
        layout[embed] = {"type": "QuantEmbedding", "table": table}
    for name, t in left.items():  # norms and any other float tensor
        if t.ggml_type not in FLOAT_TYPES:
            unsupported.add(t.ggml_type)
        state[name] = t.dequantize()
    if unsupported:
        warnings.warn(
            f"{Path(path).name}: GGUF types {', '.join(sorted(unsupported))} have no int module here; "
            "those tensors were dequantized to float",
            stacklevel=2,
        )
    _drop_file_pages(raw)
    config["leanformer"] = {LAYOUT_KEY: layout}
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return config, state, tokenizer
