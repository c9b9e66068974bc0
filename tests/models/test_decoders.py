"""Our decoder forward vs HF transformers' forward on the same (random) weights."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from tests.conftest import tiny_hf_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("fast", [False, True])
def test_logits_match_transformers(arch, fast, tiny_dirs):
    hf = tiny_hf_model(arch)
    model, tok = lf.load(tiny_dirs[arch], fast=fast)
    assert tok is None  # weights only: no tokenizer files
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)  # fmt: skip
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    hf = tiny_hf_model("llama", rope_parameters={"rope_theta": 10000.0, **scaling})
    hf.save_pretrained(tmp_path)
    model, _ = lf.load(tmp_path)
    ids = torch.arange(100)[None] % 128
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_bfloat16_close_to_float32(tiny_dirs):
    m32, _ = lf.load(tiny_dirs["llama"])
    m16, _ = lf.load(tiny_dirs["llama"], dtype="bfloat16")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        a, b = m32(ids), m16(ids).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
