"""Readers that turn a checkpoint file into `(HF-style config dict, HF-named state dict, tokenizer | None)`.

Every reader speaks HF parameter names and config keys so that one loading path builds every model.
"""

from leanformer.formats.gguf import GGUFTensor, load_gguf_tokenizer, read_gguf, read_gguf_raw
from leanformer.formats.llama2c import Llama2cTokenizer, read_llama2c

__all__ = [
    "GGUFTensor",
    "Llama2cTokenizer",
    "load_gguf_tokenizer",
    "read_gguf",
    "read_gguf_raw",
    "read_llama2c",
]
