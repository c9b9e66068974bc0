"""Streaming compression (load(..., lazy=True) + apply): bit for bit the in-memory result, on real
weights (stories260K, SmolLM2) and on sharded bf16 safetensors; refusals in one line before work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import leanformer as lf
from leanformer.compress import apply, load_recipe
from leanformer.compress.config import PruneLayers, Wanda
from leanformer.compress.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly
from leanformer.compress.stream import compressed_bytes, materialize_, state_bytes
from leanformer.errors import LeanformerError

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_INT8 = Int8WeightOnly(targets=["lm_head"], ignore=[])
RECIPES = {
    "int4-pad+head-int8": [Int4WeightOnly(group_size=32, pad=True, scale_bits=8), HEAD_INT8],
    "int8": [Int8WeightOnly()],
    "gptq-int8+head-int8": [GPTQ(bits=8), HEAD_INT8],
    "head-int8+awq-int8": [HEAD_INT8, AWQ(bits=8)],  # the calibration sees the int8 embedding
}


def same(a: torch.nn.Module, b: torch.nn.Module, vocab: int) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [n for n in sa if not torch.equal(sa[n], sb[n])] == []
    assert a.config.get("leanformer") == b.config.get("leanformer")
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("name", list(RECIPES))
def test_stories260k_streamed_equals_in_memory(shared, name):
    path = shared / "models/stories260K"
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    whole, _ = lf.load(path)
    apply(whole, RECIPES[name], calib, progress=False)
    lazy, _ = lf.load(path, lazy=True)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # nothing read yet
    apply(lazy, RECIPES[name], calib, progress=False)
    same(whole, lazy, 512)


def _bf16_shards(src, dst):
    """The tiny HF folder as two bf16 shards + index (what a downloaded sharded checkpoint looks like)."""
    dst.mkdir()
    state = {n: t.to(torch.bfloat16) for n, t in load_file(src / "model.safetensors").items()}
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ns in parts.items():
        save_file({n: state[n] for n in ns}, dst / f)
    index = {"weight_map": {n: f for f, ns in parts.items() for n in ns}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_sharded_bf16_qwen2_streams_exactly(tiny_dirs, tmp_path):
    folder = _bf16_shards(tiny_dirs["qwen2"], tmp_path / "bf16")
    lazy, _ = lf.load(folder, lazy=True)
    assert lazy.lazy.source.get("model.norm.weight").dtype == torch.bfloat16  # 2 bytes until its layer
    recipe = [Int4WeightOnly(group_size=32), Int8WeightOnly(targets=["lm_head"], ignore=[])]
    estimate = compressed_bytes(lazy, recipe)
    apply(lazy, recipe, progress=False)
    whole, _ = lf.load(folder)
    apply(whole, recipe, progress=False)
    same(whole, lazy, whole.args.vocab_size)
    assert estimate == state_bytes(lazy)  # the disk check's estimate is the real size
    saved = lf.save(lazy, None, tmp_path / "out")
    again, _ = lf.load(saved, lazy=True)  # a leanformer save streams too (our names, no sanitize)
    same(lf.load(saved)[0], materialize_(again, progress=False), whole.args.vocab_size)


@pytest.mark.slow  # ~200 s on 2 loaded cores: the GGUF dequantized twice, 30 layers quantized twice
def test_smollm2_gguf_streamed_equals_in_memory(smollm2):
    recipe = load_recipe("int4-g32-dq8+head-int8").stages
    whole, _ = lf.load(smollm2, keep_quantized=False)
    apply(whole, recipe, progress=False)
    lazy, _ = lf.load(smollm2, lazy=True)
    apply(lazy, recipe, progress=False)
    same(whole, lazy, 49152)


@pytest.mark.parametrize("bare", [False, True])
def test_gpt2_streams_exactly(tiny_dirs, tmp_path, bare):
    """GPT-2 (transformer.h.N, Conv1D weights transposed by sanitize, a tied wte table rounded by rows
    from the file), in HF's names and in the original checkpoints' bare ones (h.N., wte)."""
    folder = tiny_dirs["gpt2"]
    if bare:
        folder = tmp_path / "bare"
        folder.mkdir()
        state = load_file(tiny_dirs["gpt2"] / "model.safetensors")
        save_file({n.removeprefix("transformer."): t for n, t in state.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text((tiny_dirs["gpt2"] / "config.json").read_text())
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for recipe in (
        [Int4WeightOnly(group_size=32, pad=True), HEAD_INT8],
        [Wanda(sparsity=0.5), GPTQ(bits=8), HEAD_INT8],  # two calibrated walks
    ):
        whole, _ = lf.load(folder)
        apply(whole, copy.deepcopy(recipe), calib, progress=False)
        lazy, _ = lf.load(folder, lazy=True)
        assert all(p.is_meta for p in lazy.transformer.h.parameters())
        apply(lazy, copy.deepcopy(recipe), calib, progress=False)
        same(whole, lazy, 128)


def test_refusals_name_the_way_out(tmp_path, tiny_dirs, shared):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    state = load_file(tiny_dirs["llama"] / "model.safetensors")  # a pre-zip pickle cannot be mapped
    torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(LeanformerError, match="legacy.*safetensors.*--in-memory"):
        lf.load(d, lazy=True)
    lazy, _ = lf.load(shared / "models/stories260K", lazy=True)
    with pytest.raises(LeanformerError, match="PruneLayers: n_layers 99 must be below"):  # the plan checks it
        apply(
            lazy,
            [GPTQ(bits=8), PruneLayers(n_layers=99)],
            torch.zeros(1, 8, dtype=torch.long),
            progress=False,
        )
    with pytest.raises(LeanformerError, match="outside the decoder layers"):
        apply(lazy, GPTQ(bits=8, ignore=[]), torch.zeros(1, 8, dtype=torch.long), progress=False)
    with pytest.raises(LeanformerError, match="Wanda needs calibration"):  # before the first walk reads
        apply(lazy, [Wanda(sparsity=0.5), GPTQ(bits=8)], None, progress=False)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # refused before reading anything
