"""Test helper: small round-to-nearest encoders for GGML's Q4_K / Q5_K / Q6_K blocks (the `gguf`
package dequantizes them but cannot quantize them), tiny llama GGUF files that use them, and a
re-quantizer that turns a real GGUF file into a K-quant one (for the benchmark in the report).

The encoders only need to produce valid blocks close to the input: the reference for every test is
`gguf.quants.dequantize` of the bytes they write. Block layouts (little-endian fp16 d / dmin):
  Q4_K 144 B / 256 values: d, dmin, 12 B scales, qs[128]             w = d sc_j q - dmin m_j
  Q5_K 176 B / 256 values: d, dmin, 12 B scales, qh[32], qs[128]     (q 5-bit; sub-blocks of 32)
  Q6_K 210 B / 256 values: ql[128], qh[64], int8 sc[16], d             w = d sc_g (q - 32), groups of 16
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from tests.formats.tiny_gguf import GGUF_NAMES, TOP_NAMES, llamacpp_permute, write_gguf

Q = gguf.GGMLQuantizationType
QK = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [nb] -> uint8 [nb, 2]."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit sc, m [nb, 8] -> the 12-byte K-quant scale field: bytes 0-3 sc 0-3, bytes 4-7 m 0-3 (low 6
    bits; top 2 bits carry bits 4-5 of sc / m 4-7), bytes 8-11 low nibbles of sc 4-7 | m 4-7 << 4."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    hi = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    mix = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, hi, mix], axis=1).astype(np.uint8)


def _affine_k(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """x [nb, 8, 32] -> d, dmin fp16 [nb], sc, m uint8 [nb, 8], q uint8 [nb, 8, 32] in 0..nmax."""
    lo = np.minimum(x.min(-1), 0)  # sub-block min, kept <= 0 so m_j >= 0
    step = (x.max(-1) - lo) / nmax
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.round(step / d.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        m = np.nan_to_num(np.round(-lo / dmin.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        big_d = d.astype(np.float32)[:, None] * sc
        big_m = dmin.astype(np.float32)[:, None] * m
        q = np.nan_to_num(np.round((x + big_m[..., None]) / big_d[..., None]))
    return d, dmin, sc, m, q.clip(0, nmax).astype(np.uint8)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """w float [..., K] (K % 256 == 0) -> uint8 [..., K / 256 * 144]."""
    x = w.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _affine_k(x, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # run r: sub-block 2r low, 2r + 1 high
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qs], axis=1)
    return out.reshape(*w.shape[:-1], -1)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """w float [..., K] -> uint8 [..., K / 256 * 176]; bit j of qh[l] is the 5th bit of sub-block j's
    value l, the low 4 bits are packed as in Q4_K."""
    x = w.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _affine_k(x, 31)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)  # [nb, 32]
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qh, qs], axis=1)
    return out.reshape(*w.shape[:-1], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """w float [..., K] -> uint8 [..., K / 256 * 210]. In each half of 128 values, value 32 i + l takes
    nibble i // 2 of ql[32 (i % 2) + l] and bits 2i, 2i + 1 of qh[l] (its top two bits)."""
    x = w.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31.5  # per 16 values; codes q - 32 in -32..31
    d = (step.max(-1) / 127).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.round(step / d.astype(np.float32)[:, None])).clip(0, 127).astype(np.int8)
        big = d.astype(np.float32)[:, None] * sc
        q = np.nan_to_num(np.round(x / big[..., None])).clip(-32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [nb, half, i, l]
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)  # [nb, half, i % 2, l]
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(*w.shape[:-1], -1)


ENCODERS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """Any type: ours for K-quants, the `gguf` package's otherwise."""
    enc = ENCODERS.get(qtype)
    return enc(w) if enc is not None else gguf.quants.quantize(w, qtype)


def _gguf_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[part]}.{suffix}"


def write_kquant_gguf(path: Path, cfg: dict, sd: dict[str, torch.Tensor], qtypes: dict[str, Q]) -> None:
    """tiny_gguf.write_gguf with K-quant types allowed in `qtypes` (substring -> type, first match)."""
    kq = {}
    for name, t in sd.items():
        qtype = next((q for key, q in qtypes.items() if key in name), None)
        if qtype in ENCODERS and t.ndim == 2:
            kq[name] = qtype
    rest = {n: t for n, t in sd.items() if n not in kq}

    def add_kquants(w: gguf.GGUFWriter) -> None:
        for name, qtype in kq.items():
            data = sd[name].numpy().astype(np.float32)
            if "q_proj" in name or "k_proj" in name:  # llama.cpp's row order, as write_gguf does
                heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
                data = llamacpp_permute(data, heads)
            w.add_tensor(_gguf_name(name), quantize(data, qtype), raw_dtype=qtype)

    write_gguf(
        path, cfg, rest, qtypes={k: v for k, v in qtypes.items() if v not in ENCODERS}, extra=add_kquants
    )


def requantize_gguf(src: Path, dst: Path, pick) -> dict[str, str]:
    """Copy GGUF `src` (metadata, tokenizer, tensor order) to `dst`, re-quantizing each 2-D tensor to
    `pick(gguf_name, shape) -> Q | None` (None: keep as stored). Returns gguf name -> type written."""
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    written = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        qtype = pick(t.name, shape) if len(shape) == 2 else None
        if qtype is None:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
            written[t.name] = t.tensor_type.name
        else:
            values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            w.add_tensor(t.name, quantize(values, qtype), raw_dtype=qtype)
            written[t.name] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
