"""The engines the encoder benchmark (bench/encoders.py) times: text in → L2-normalized embeddings out.

Each is an Engine: `encode(texts, batch_size)` and `cap(tokens)`, which truncates every text to at most
`tokens` tokens (None: the model's own limit), so that one set of long texts serves as a 128-token and a
256-token workload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

ST = "sentence-transformers fp32"
FP32 = "leanformer fp32 (torch)"
BF16 = "leanformer bf16 (torch)"
F16 = "leanformer fp16 (torch)"
INT8 = "leanformer int8 dynamic (torch)"
ORT32 = "leanformer fp32 (onnxruntime)"
ORT8 = "onnxruntime int8 dynamic (per-channel)"


def pruned_name(fraction: float) -> str:
    return f"leanformer fp32, {fraction:.0%} heads pruned"


@dataclass
class Engine:
    encode: Callable[[list[str], int], np.ndarray]
    cap: Callable[[int | None], None]
    info: dict = field(default_factory=dict)  # copied into the engine's results (e.g. heads pruned)


def _ours(model, tok) -> Engine:
    """A models.bert.Model or an export.OrtEncoder, through encoders.embed (token-length batching)."""
    from leanformer.encoders.embed import embed

    default = model.args.max_seq_length

    def cap(tokens: int | None) -> None:
        model.args.max_seq_length = default if tokens is None else tokens

    return Engine(lambda texts, bs: embed(model, tok, texts, bs, normalize=True), cap)


def _sentence_transformers(model_path: str) -> Engine:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_path, device="cpu")
    default = st.max_seq_length

    def cap(tokens: int | None) -> None:
        st.max_seq_length = default if tokens is None else tokens

    return Engine(lambda texts, bs: st.encode(texts, batch_size=bs, normalize_embeddings=True), cap)


def _onnxruntime(model, tok, fp32: bool, int8: bool) -> dict[str, Engine]:
    """Our ONNX export of `model` in ONNX Runtime, and ONNX Runtime's own dynamic int8 quantization of
    that same file (quantize_dynamic, int8 weights per channel, uint8 activations per tensor at run time)."""
    import logging
    import tempfile
    from pathlib import Path

    from leanformer.export.encoder import ONNX_FILE, OrtEncoder, export_onnx, load_onnx_encoder

    out: dict[str, Engine] = {}
    with tempfile.TemporaryDirectory() as d:  # sessions hold the graphs in memory once created
        export_onnx(model, d, tok, dynamo=False)
        runner, rtok = load_onnx_encoder(d)
        if fp32:
            out[ORT32] = _ours(runner, rtok)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root = logging.getLogger()
            level, q8 = root.level, str(Path(d) / "model.int8.onnx")
            root.setLevel(logging.ERROR)  # "consider pre-processing": we quantize the export as it is
            try:
                quantize_dynamic(str(Path(d) / ONNX_FILE), q8, per_channel=True, weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
            out[ORT8] = _ours(OrtEncoder(q8, runner.config), rtok)
    return out


def build_engines(
    model_path: str,
    calibration: list[str],
    onnxruntime: bool = True,
    ort_int8: bool = True,
    int8: bool = True,
    prune: tuple[float, ...] = (),
    bf16: bool = True,
) -> tuple[dict[str, Engine], object, object]:
    """name → Engine, in table order; also our fp32 model and tokenizer (the reference for the rest).
    bf16: the model loaded with dtype bfloat16 too (bf16 matmuls, fp32 elsewhere: encoders/build.py),
    where the CPU computes bf16 natively (AVX-512 BF16 / AMX; emulated bf16 is slower than fp32), and with
    dtype float16 (fp16 matmuls, kernels/h16.py) where the CPU has AVX512-FP16."""
    from leanformer.encoders.build import load_encoder
    from leanformer.encoders.prune_heads import prune_heads_auto_
    from leanformer.kernels.cpu import native_bf16
    from leanformer.kernels.h16 import native_f16

    engines = {ST: _sentence_transformers(model_path)}
    model, tok = load_encoder(model_path)
    engines[FP32] = _ours(model, tok)
    if bf16 and native_bf16():
        engines[BF16] = _ours(*load_encoder(model_path, dtype=torch.bfloat16))
    if bf16 and native_f16():
        engines[F16] = _ours(*load_encoder(model_path, dtype=torch.float16))
    if int8:
        from leanformer.compress import Int8Dynamic, quantize_

        q, qtok = load_encoder(model_path, fast=False)  # plain Linears: quantize_ swaps nn.Linear
        quantize_(q, Int8Dynamic(), progress=False)
        engines[INT8] = _ours(q, qtok)
    if onnxruntime or ort_int8:
        engines |= _onnxruntime(model, tok, fp32=onnxruntime, int8=ort_int8)
    for frac in prune:
        m, t = load_encoder(model_path)
        prune_heads_auto_(m, t, calibration, frac, method="taylor", steps=4)
        engines[pruned_name(frac)] = e = _ours(m, t)
        e.info = {"heads_pruned": frac, "heads_per_layer": list(m.args.heads_per_layer)}
    return engines, model, tok
