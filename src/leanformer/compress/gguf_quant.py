"""GGUF block-quantized weights straight into int8 / int5 / int4 modules (and F16 / BF16 matrices into 16-bit
float ones): `load(path, keep_quantized=True)`.

No full-precision copy of the model is made: each tensor's blocks are split into codes and scales
(`unpack_blocks`, one tensor at a time) and repacked in our module layout. The mappings are exact
(block layouts in formats/gguf.py; d, m, dmin are fp16 in the file, sc / m_j small integers):
- Q4_0, w = d * (q - 8)  -> Int4Linear group 32, symmetric: scale = d and no zero points held.
- Q4_1, w = d * q + m    -> Int4Linear group 32: scale = d, zero = m + 8 d in fp32. (q - 8) * d is exact
  in fp32, and so is m + 8 d unless the two fp16 values are more than 2^13 apart in magnitude, so
  (q - 8) * d + zero rounds once, like d * q + m: the weights are bit-identical to gguf's dequantized
  ones (checked for every matrix of SmolLM2-135M's Q4_1 file).
- Q4_K, w = (d sc_j) q - dmin m_j per 32-column sub-block -> Int4Linear group 32: scale = d sc_j,
  zero = 8 d sc_j - dmin m_j. Both products are exact in fp32 (11-bit times 6-bit significands), so
  this is Q4_1's case with m = -dmin m_j: bit-identical while zero is exact in fp32, i.e. unless
  d sc_j and dmin m_j are ~2^7 apart in magnitude; otherwise within one fp32 rounding of zero.
- Q8_0, w = d * q        -> Int8Linear with one scale per 32 columns (the GEMV kernel reads them).
- Q5_0, w = d * (q - 16) -> Int5Linear (compress/int5.py): codes q, scale d, 24 bytes per 32 weights
  (the file's 22) where int8 would take 36. A fused module whose parts are Q5_0 and Q4_0 is int5 too:
  w = d * (q - 8) = d * ((q + 8) - 16). Q5_0 mixed with Q8_0 / Q6_K (llama.cpp's Q4_K_M does it for
  qkv where v is Q8_0) goes to Int8Linear group 32, codes q - 16 in -16..15.
- Q6_K, w = (d sc_g) (q - 32) per 16 columns -> Int8Linear group 16, codes q - 32, scale d sc_g
  (exact: 11-bit times 8-bit).
Q5_K (w = (d sc_j) q - dmin m_j with 5-bit q) fits neither form: int4 has 4-bit codes and int8 no zero
point, so it is dequantized to float, like Q5_1, Q2_K / Q3_K and the IQ types.
Fused modules (qkv_proj = q|k|v, gate_up_proj = gate|up, as models/llama.sanitize fuses) keep that
form when their parts agree: all of Q4_0 / Q4_1 / Q4_K -> int4; Q5_0 with Q4_0 -> int5; all of
Q8_0 / Q4_0 / Q5_0 / Q6_K -> int8 (group 16 if any part is Q6_K: a 32-column scale is two equal 16-column ones).
F16 / BF16 matrices (llama.cpp's converter writes F16 by default) -> F16Linear / BF16Linear
(compress/half.py): the file's 2 bytes per weight, applied in fp32. Anything else (F32 tensors, unmapped
types, mixed forms such as F16 with Q8_0 or Q4_1 with an int8 type) becomes an ordinary float Linear,
dequantized one tensor at a time. A quantized token embedding becomes a QuantEmbedding: rows
dequantized on lookup, and when the file ties it to the LM head (no output.weight) the head's module
is the table, so the matrix is stored once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanformer.compress.half import BF16Linear, F16Linear
from leanformer.errors import LeanformerError
from leanformer.formats.gguf import (
    CODE_OFFSET,
    GGUFTensor,
    drop_file_pages,
    load_gguf_tokenizer,
    read_gguf_raw,
    unpack_blocks,
)

GROUP = 32  # int4 group: the block width of Q4_0 / Q4_1 and the sub-block width of Q4_K
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
INT8_GROUP = {"Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q6_K": 16}  # columns per scale in the int8 form
INT8_TYPES = set(INT8_GROUP)
INT5_TYPES = {"Q5_0", "Q4_0"}  # Q4_0's codes shift into Q5_0's: q + 8
FLOAT_TYPES = {"F32", "F16", "BF16"}
HALF_TYPES = {"F16": F16Linear, "BF16": BF16Linear}  # 16-bit float matrices -> their module
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
    if "min" not in b:  # Q4_0
        zero = np.zeros_like(d)
    else:  # Q4_1 / Q4_K: min + 8 d, one rounding to fp32 (exact in the cases the module doc gives)
        zero = (b["min"].astype(np.float64) + 8.0 * d.astype(np.float64)).astype(np.float32)
    return torch.from_numpy(b["q"]), torch.from_numpy(d), torch.from_numpy(zero)


def _int8(t: GGUFTensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> q int8 [N, K], scales fp32 [N, K/group]; `group` divides the type's own group (a scale
    repeats over the narrower groups it covers)."""
    b = unpack_blocks(t)
    q, off = b["q"], CODE_OFFSET[t.ggml_type]
    if off:  # unsigned codes -> signed int8 q - off (|q - off| <= 32)
        q = (q.astype(np.int16) - off).astype(np.int8)
    scales = b["scale"].astype(np.float32)
    if INT8_GROUP[t.ggml_type] != group:
        scales = np.repeat(scales, INT8_GROUP[t.ggml_type] // group, axis=1)
    return torch.from_numpy(q), torch.from_numpy(scales)


def _int5(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> codes uint8 [N, K] in 0..31 (w = d * (q - 16)), scales fp32 [N, K/32]."""
    b = unpack_blocks(t)
    q = b["q"] + np.uint8(16 - CODE_OFFSET[t.ggml_type])  # Q4_0: 0..15 -> 8..23
    return torch.from_numpy(q), torch.from_numpy(b["scale"].astype(np.float32))


def _half(t: GGUFTensor) -> torch.Tensor:
    """An F16 / BF16 tensor's values as they are in the file (a copy: the mapping is not kept)."""
    bits = torch.from_numpy(np.array(t.data).view(np.int16).reshape(t.shape))
    return bits.view(torch.float16 if t.ggml_type == "F16" else torch.bfloat16)


def _cat(ts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Row-stack; a single part is handed over as is (no second copy of a 49152-row embedding)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _as_held(scales: torch.Tensor, zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Group-32 scales (and zeros) as the modules hold them (QuantLinear.compact_scales): fp16 where it
    holds every value (the blocks' own fp16 scales), zeros only with the scales; made here, so the
    loaded state never holds a model's worth of fp32 scales beside them (+8-11 MiB of peak RSS)."""
    from leanformer.compress.qbase import exact_half

    half = exact_half(scales)
    out = {"scales": scales if half is None else half}
    if zeros is not None:
        hz = exact_half(zeros) if half is not None else None
        out["zeros"] = zeros if hz is None else hz
    return out


def quantized_form(parts: list[GGUFTensor]) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Rows of `parts` stacked into one module: (layout spec or None for float, its weight tensors)."""
    from leanformer.compress.int5 import PACKING, pack_codes
    from leanformer.compress.kernels import pack_nibbles

    kinds = {p.ggml_type for p in parts}
    if kinds <= INT4_TYPES:
        codes, scales, zeros = zip(*(_int4(p) for p in parts))
        tensors = {"qweight": pack_nibbles(_cat(codes)), **_as_held(_cat(scales), _cat(zeros))}
        if kinds == {"Q4_0"}:  # symmetric: no zero points held at all
            del tensors["zeros"]
            return {"type": "Int4Linear", "group_size": GROUP, "symmetric": True}, tensors
        return {"type": "Int4Linear", "group_size": GROUP}, tensors
    if "Q5_0" in kinds and kinds <= INT5_TYPES:
        codes, scales = zip(*(_int5(p) for p in parts))
        qweight, qhigh = pack_codes(_cat(codes))
        packing = torch.tensor([PACKING], dtype=torch.uint8)
        tensors = {"qweight": qweight, "qhigh": qhigh, **_as_held(_cat(scales)), "packing": packing}
        return {"type": "Int5Linear", "group_size": GROUP}, tensors
    if kinds <= INT8_TYPES:
        group = min(INT8_GROUP[k] for k in kinds)
        q, scales = zip(*(_int8(p, group) for p in parts))
        spec = {"type": "Int8Linear", "group_size": group}
        held = _as_held(_cat(scales)) if group == GROUP else {"scales": _cat(scales)}
        return spec, {"weight_int8": _cat(q), **held}
    if len(kinds) == 1 and (kind := next(iter(kinds))) in HALF_TYPES:
        cls = HALF_TYPES[kind]
        return {"type": cls.__name__}, {cls.BUFFER: _cat([_half(p) for p in parts])}
    return None, {"weight": _cat([p.dequantize() for p in parts])}


def read_gguf_quantized(
    path: str | Path, with_tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any | None]:
    """Config (with config["leanformer"]["quantized_modules"], the layout `loading.build` rebuilds),
    state dict in our module names (fused, quantized modules' buffers) and tokenizer."""
    from leanformer.compress.calibrate import trim_heap
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
            p.ggml_type
            for p in parts
            if p.ggml_type not in INT4_TYPES | INT5_TYPES | INT8_TYPES | FLOAT_TYPES
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
        drop_file_pages(raw)
        trim_heap()  # the layer's numpy / torch temporaries: measured 25-35 MB left resident otherwise
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
    drop_file_pages(raw)
    trim_heap()
    config["leanformer"] = {LAYOUT_KEY: layout}
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return config, state, tokenizer
