"""Corrupt and hostile model files (issue #10): every one is a one-line LeanformerError naming the file,
nothing in a file is ever executed, and an index cannot make the loader read outside the model folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

import leanformer as lf
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf")
    tiny_hf_model("llama").save_pretrained(d)
    return d


@pytest.fixture
def model_dir(hf_dir, tmp_path) -> Path:
    """A fresh copy of the tiny HF folder (config.json + model.safetensors) to damage."""
    return Path(shutil.copytree(hf_dir, tmp_path / "model"))


def refused(path, match: str, names: str) -> str:
    """lf.load(path) fails with one line that matches `match` and names the file `names`."""
    with pytest.raises(lf.LeanformerError, match=match) as e:
        lf.load(path, fast=False)
    message = str(e.value)
    assert "\n" not in message and names in message, message
    return message


# --- pytorch_model.bin: weights_only=True, so pickled code is refused and never run ----------------


class Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _as_bin_checkpoint(model_dir: Path) -> Path:
    (model_dir / "model.safetensors").unlink()
    return model_dir / "pytorch_model.bin"


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_payload_is_refused_and_never_runs(model_dir, tmp_path, zip_format):
    bin_path = _as_bin_checkpoint(model_dir)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is live: plain unpickling runs it
    assert control.exists()
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, bin_path, _use_new_zipfile_serialization=zip_format)
    refused(model_dir, "refused without running", "pytorch_model.bin")
    assert not marker.exists()


def test_garbage_and_truncated_pytorch_bin(model_dir):
    bin_path = _as_bin_checkpoint(model_dir)
    bin_path.write_bytes(os.urandom(64) + b"garbage")
    refused(model_dir, "pytorch_model.bin", "pytorch_model.bin")
    torch.save({k: torch.zeros(2) for k in "ab"}, bin_path)
    bin_path.write_bytes(bin_path.read_bytes()[:100])
    refused(model_dir, "corrupt or truncated", "pytorch_model.bin")
    torch.save([torch.zeros(2)], bin_path)
    refused(model_dir, "not a dict of named tensors", "pytorch_model.bin")


# --- sharded checkpoints: the index ------------------------------------------------------------------


def _index(model_dir: Path, content) -> Path:
    """Move the weights to a shard and write `content` as the index (JSON unless bytes/str)."""
    shutil.move(model_dir / "model.safetensors", model_dir / "shard-1.safetensors")
    index = model_dir / "model.safetensors.index.json"
    if isinstance(content, (bytes, str)):
        index.write_bytes(content if isinstance(content, bytes) else content.encode())
    else:
        index.write_text(json.dumps(content))
    return index


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not a readable JSON index"),
        (b"\xff\xfe\x00\x01", "not a readable JSON index"),
        ([1, 2], "no weight_map"),
        ({"metadata": {}}, "no weight_map"),
        ({"weight_map": ["shard-1.safetensors"]}, "no weight_map"),
        ({"weight_map": {"w": 5}}, "refusing shard 5"),
        ({"weight_map": {"w": "shard-1.bin"}}, "not a .safetensors file"),
    ],
)
def test_malformed_index(model_dir, content, match):
    _index(model_dir, content)
    refused(model_dir, match, "model.safetensors.index.json")


def test_index_cannot_point_outside_the_folder(model_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model_dir / "model.safetensors", outside)  # a real, loadable file: only the path is wrong
    index = model_dir / "model.safetensors.index.json"
    for target in ("../elsewhere.safetensors", str(outside), "sub/../../elsewhere.safetensors"):
        index.write_text(json.dumps({"weight_map": {"w": target}}))
        refused(model_dir, "refusing shard", "model.safetensors.index.json")
    (model_dir / "link.safetensors").symlink_to(outside)
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "link.safetensors"}})
    )
    refused(model_dir, "resolves outside the model folder", "model.safetensors.index.json")


def test_hf_hub_cache_snapshot_links_still_load(hf_dir, tmp_path):
    """The HF cache keeps shards in ../../blobs and links them from snapshots/<rev>/: that stays loadable."""
    repo = tmp_path / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(hf_dir / "config.json", snapshot / "config.json")
    shutil.copy(hf_dir / "model.safetensors", repo / "blobs" / "f00d")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/f00d")
    names = lf.formats.safetensors_io.read_safetensors(hf_dir / "model.safetensors")
    index = {"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    assert lf.load(snapshot, fast=False)[0] is not None


# --- safetensors -------------------------------------------------------------------------------------


def _header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "shorter than its 8-byte header"),
        (b"\x00" * 5, "shorter than its 8-byte header"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds the file size"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (_header([1, 2]), "not a JSON object"),
        (_header({"w": 3}), "not an object"),
        (_header({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}), "unsupported dtype"),
        (_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "bad shape"),
        (
            _header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)),
            "bad data_offsets",
        ),
        # a huge shape is caught by arithmetic, before any allocation is attempted
        (_header({"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 4]}}, bytes(4)), "span"),
        (_header({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(8)), "truncated"),
    ],
)
def test_corrupt_safetensors(model_dir, blob, match):
    (model_dir / "model.safetensors").write_bytes(blob)
    refused(model_dir, match, "model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(model_dir, keep):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    refused(model_dir, "corrupt or truncated", "model.safetensors")


# --- config.json and tokenizer files -----------------------------------------------------------------


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{oops", "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"architectures": 7}', "unsupported architecture"),
        (b'{"architectures": ["LlamaForCausalLM"]}', "missing key"),
    ],
)
def test_garbage_config(model_dir, content, match):
    (model_dir / "config.json").write_bytes(content)
    refused(model_dir, match, "config.json")


def test_config_values_of_the_wrong_type(model_dir):
    _edit_config(model_dir, hidden_size="big")
    refused(model_dir, "invalid model config", "config.json")
    _edit_config(model_dir, hidden_size=64, leanformer=[1])
    refused(model_dir, "invalid model config", "config.json")


def test_garbage_tokenizer_file(model_dir):
    (model_dir / "tokenizer.json").write_text("{definitely not a tokenizer")
    refused(model_dir, "tokenizer files cannot be read", str(model_dir))


# --- GGUF and llama2.c -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "blob", [b"", b"GGUF", os.urandom(300), b"GGUF" + struct.pack("<I", 3) + os.urandom(200)]
)
def test_garbage_gguf(tmp_path, blob):
    path = tmp_path / "model.gguf"
    path.write_bytes(blob)
    refused(path, "not a readable GGUF file", "model.gguf")
    with pytest.raises(lf.LeanformerError, match="not a readable GGUF file"):
        lf.load(path, keep_quantized=True)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<IIQQ", 0x46554747, 1, 0, 0),  # GGUF v1
        struct.pack("<IIQQ", 0x46554747, 3 << 24, 0, 0),  # big-endian
        struct.pack("<IIQQQ", 0x46554747, 3, 0, 1, 2**62),  # a key longer than the file
        struct.pack("<IIQQQ", 0x46554747, 3, 0, 1, 1) + b"k" + struct.pack("<I", 99),  # unknown value type
        struct.pack("<IIQQQ", 0x46554747, 3, 0, 1, 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**61),  # huge array
        struct.pack("<IIQQQ", 0x46554747, 3, 0, 1, 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1),  # not UTF-8
    ],
)
def test_malformed_gguf_header(tmp_path, header):
    path = tmp_path / "model.gguf"
    path.write_bytes(header + bytes(64))
    with pytest.raises(lf.LeanformerError, match="not a readable GGUF file"):
        lf.load(path, keep_quantized=True)


def test_truncated_gguf(tmp_path):
    from tests.formats.test_gguf import tiny_config
    from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf

    path = tmp_path / "model.gguf"
    cfg = tiny_config()
    write_gguf(path, cfg, hf_llama_state_dict(cfg))
    data = path.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        refused(path, "GGUF", "model.gguf")


def test_garbage_llama2c(tmp_path, shared):
    path = tmp_path / "model.bin"
    for blob in (b"12", os.urandom(4096), struct.pack("<7i", 8, 16, 1, 2, 2, 32, 16)):
        path.write_bytes(blob)
        refused(path, "llama2.c", "model.bin")
    real = (shared / "models/stories260K/stories260K.bin").read_bytes()
    path.write_bytes(real[: len(real) // 3])
    refused(path, "truncated", "model.bin")


# --- NaN / inf weights: loadable, but never silently ------------------------------------------------


def test_nan_weights_warn_on_load(tmp_path):
    hf = tiny_hf_model("llama")
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        hf.lm_head.weight[1, 1] = float("inf")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"2 weight tensor\(s\) hold NaN or infinite"):
        lf.load(tmp_path, fast=False)
