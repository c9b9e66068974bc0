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
from .engine.generate import GenerationStats, generate, stream_generate
from .engine.sampling import SamplingParams
from .errors import LeanformerError
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
]
__version__ = "0.1.0"
