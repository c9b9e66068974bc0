"""Formats, bad input, save/reload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import leanformer as lf
from tests.conftest import tiny_hf_model


def test_missing_path():
    with pytest.raises(lf.LeanformerError, match="not found"):
        lf.load("/nonexistent/model")


def test_unknown_architecture_lists_supported(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        lf.LeanformerError, match="unsupported architecture 'FalconForCausalLM'.*LlamaForCausalLM"
    ):
        lf.load(d)


def test_truncated_weights(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lf.LeanformerError, match="corrupt or truncated"):
        lf.load(d)


def test_shape_mismatch(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lf.LeanformerError, match="has shape .* but the config implies"):
        lf.load(d)


def test_no_weights(tmp_path, tiny_dirs):
    shutil.copy(tiny_dirs["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(lf.LeanformerError, match="no weights"):
        lf.load(tmp_path)


@pytest.mark.parametrize("layout", ["sharded", "pytorch_bin"])
def test_sharded_and_bin_checkpoints(layout, tmp_path):
    hf = tiny_hf_model("qwen2")
    if layout == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = lf.load(tmp_path)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_save_and_reload_identical(arch, tiny_dirs, tmp_path):
    model, _ = lf.load(tiny_dirs[arch])
    out = lf.save(model, None, tmp_path / "saved")
    assert not list(tmp_path.glob(".saved.*"))  # temp dir renamed away
    again, _ = lf.load(out)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_unknown_dtype(tiny_dirs):
    with pytest.raises(lf.LeanformerError, match="unknown dtype"):
        lf.load(tiny_dirs["llama"], dtype="int3")
