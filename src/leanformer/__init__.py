"""leanformer: make trained Transformers fast and small on the hardware you have, and measure the cost.

import leanformer as lf
model, tok = lf.load("path/to/model")          # HF folder, .gguf, or llama2.c .bin
print(lf.generate(model, tok, "Once upon a time", max_new_tokens=64))
"""

from leanformer.compress import (
    AWQ,
    GPTQ,
    BF16WeightOnly,
    F16WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    KVCache,
    LowRank,
    Magnitude,
    PruneFFN,
    PruneHeads,
    PruneLayers,
    Recipe,
    SparseGPT,
    Wanda,
    apply,
    load_recipe,
    prune_,
    quantize_,
)
from leanformer.compress.sparse import SparseStorage
from leanformer.distributed import parallelize_, pipeline_
from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import classify, embed
from leanformer.encoders.probe import train_probe
from leanformer.encoders.prune_encoder import prune_encoder_
from leanformer.encoders.prune_heads import head_importance, prune_heads_, prune_heads_auto_
from leanformer.engine.generate import GenerationStats, generate, stream_generate
from leanformer.engine.sampling import SamplingParams
from leanformer.engine.speculative import DraftModel, LayerSkip, PromptLookup
from leanformer.errors import LeanformerError
from leanformer.export.decoder import export_decoder_onnx, load_onnx_decoder
from leanformer.export.encoder import export_onnx, load_onnx_encoder
from leanformer.loading import load, save
from leanformer.models.kv_policy import HeavyHitters, SinkWindow, SnapKV
from leanformer.train import DistillConfig, LossWeights, distill, make_student

__all__ = [
    "AWQ",
    "GPTQ",
    "GenerationStats",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "BF16WeightOnly",
    "F16WeightOnly",
    "KVCache",
    "Recipe",
    "apply",
    "load_recipe",
    "quantize_",
    # pruning and low-rank (calibrated like GPTQ; composable with quantization in one recipe)
    "LowRank",
    "Magnitude",
    "PruneFFN",
    "PruneHeads",
    "PruneLayers",
    "SparseGPT",
    "SparseStorage",
    "Wanda",
    "prune_",
    "LeanformerError",
    "SamplingParams",
    "generate",
    "load",
    "save",
    "stream_generate",
    # speculative decoding (exact): prompt lookup, a draft model, or the model's own first layers
    "DraftModel",
    "LayerSkip",
    "PromptLookup",
    # long sequences: KV-cache policies for generate / stream_generate
    "HeavyHitters",
    "SinkWindow",
    "SnapKV",
    # knowledge distillation: a smaller student, or healing a pruned model
    "DistillConfig",
    "LossWeights",
    "distill",
    "make_student",
    # one model across processes (torch.distributed): tensor / pipeline parallel
    "parallelize_",
    "pipeline_",
    # encoders (BERT family): embeddings, classification / probes, head pruning
    "classify",
    "embed",
    "head_importance",
    "load_encoder",
    "prune_encoder_",
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
