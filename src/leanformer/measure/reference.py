"""The same weights in HF transformers: the reference every exactness test and benchmark compares to.

Any file leanformer reads (HF folder, GGUF, llama2.c) becomes an HF config + HF-named state dict, so
one function builds the transformers model from it; no second loader, no hub access.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from leanformer.errors import LeanformerError
from leanformer.loading import DTYPES, read_any


def load_hf_reference(path: str | os.PathLike, dtype: str = "float32"):
    """(transformers model, tokenizer) with exactly the weights `leanformer.load(path)` uses."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state_dict, tok = read_any(Path(path))
    if "leanformer" in config:
        raise LeanformerError("a leanformer-saved (possibly compressed) model has no transformers equivalent")
    fields = {
        k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")
    }
    model_type = config.get("model_type") or _model_type(config)
    hf_config = AutoConfig.for_model(model_type, **fields)
    hf_config.architectures = config.get("architectures")
    model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[dtype])
    missing, unexpected = model.load_state_dict(
        {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}, strict=False
    )
    missing = [
        m for m in missing if not m.endswith("lm_head.weight") and "rotary" not in m and "attn.bias" not in m
    ]
    if missing:
        raise LeanformerError(f"transformers model is missing weights, e.g. {missing[0]!r}")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tok


def _model_type(config: dict) -> str:
    arch = (config.get("architectures") or [""])[0]
    for prefix, kind in (("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2"), ("GPT2", "gpt2")):
        if arch.startswith(prefix):
            return kind
    raise LeanformerError(f"no transformers reference for architecture {arch!r}")


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits
