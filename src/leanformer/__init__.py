"""leanformer: make trained Transformers fast and small on the hardware you have, and measure the cost.

import leanformer as lf
model, tok = lf.load("path/to/model")          # HF folder, .gguf, or llama2.c .bin
print(lf.generate(model, tok, "Once upon a time", max_new_tokens=64))
"""

from .compress import (
    AWQ,
    GPTQ,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    KVCache,
    Recipe,
    apply,
    load_recipe,
    quantize_,
)
from .encoders import classify, embed, load_encoder, train_probe
from .encoders_prune import head_importance, prune_heads_, prune_heads_auto_
from .engine.generate import GenerationStats, generate, stream_generate
from .engine.sampling import SamplingParams
from .errors import LeanformerError
from .export import export_onnx, load_onnx_encoder
from .export_decoder import export_decoder_onnx, load_onnx_decoder
from .loading import load, save

__all__ = [
    "AWQ",
    "GPTQ",
    "GenerationStats",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "KVCache",
    "Recipe",
    "apply",
    "load_recipe",
    "quantize_",
    "LeanformerError",
    "SamplingParams",
    "generate",
    "load",
    "save",
    "stream_generate",
    # encoders (BERT family): embeddings, classification / probes, head pruning
    "classify",
    "embed",
    "head_importance",
    "load_encoder",
    "prune_heads_",
    "prune_heads_auto_",
    "train_probe",
    # ONNX export (encoders; decoder LMs with past key/values) and the ONNX Runtime runners
    "export_decoder_onnx",
    "export_onnx",
    "load_onnx_decoder",
    "load_onnx_encoder",
]
__version__ = "0.1.0"
