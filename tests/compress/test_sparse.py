"""Sparse storage of pruned weights (compress/sparse.py): the bitmask layout round-trips exactly for any
pattern and dtype; on the real stories260K a pruned model saved with SparseStorage reloads with
identical logits (memory "dense") or the same logits to float rounding (memory "sparse"), and its file
shrinks by the factor the layout promises; bad configs fail in one line."""

from __future__ import annotations

import pytest
import torch

from leanformer.compress import Int8WeightOnly, Magnitude, apply, prune_
from leanformer.compress.config import QuantConfig
from leanformer.compress.sparse import (
    SparseLinear,
    SparseStorage,
    SparseStoredInt8Linear,
    SparseStoredLinear,
    pack,
    set_memory_,
    unpack,
)
from leanformer.engine.generate import decode
from leanformer.engine.sampling import SamplingParams
from leanformer.errors import LeanformerError
from leanformer.loading import load, save

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("k", [64, 172])  # 172: a mask byte half used
def test_pack_roundtrip_any_pattern(dtype, k):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, k, generator=g) * 40).to(dtype)
    w[torch.rand(24, k, generator=g) < 0.55] = 0  # unstructured, every row its own count
    w[3] = 0  # an all-zero row
    c = int((w != 0).sum(1).max())
    mask, values = pack(w, c)
    assert mask.dtype == torch.uint8 and mask.shape == (24, (k + 7) // 8) and values.shape == (24, c)
    assert torch.equal(unpack(mask, values, k), w)
    with pytest.raises(LeanformerError, match="more than the"):
        pack(w, c - 1)


@pytest.fixture(scope="module")
def stories(shared):
    return shared / "models/stories260K"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _file(folder):
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_saved_sparse_reloads_identical_and_smaller(stories, tmp_path, pattern):
    model, tok = load(stories)
    prune_(model, Magnitude(sparsity=0.5, pattern=pattern), progress=False)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    save(model, tok, tmp_path / "dense")
    cfg = SparseStorage()
    apply(model, cfg)
    assert torch.equal(_logits(model, ids), ref)  # the in-memory model is unchanged
    save(model, tok, tmp_path / "sparse")
    back, _ = load(tmp_path / "sparse")
    assert sum(isinstance(m, SparseStoredLinear) for m in back.modules()) == len(cfg.capacity) > 0
    assert torch.equal(_logits(back, ids), ref)
    # the file shrinks by exactly the packed tensors' saving (headers aside)
    saved = 0
    for name, c in cfg.capacity.items():
        n, k = model.get_submodule(name).weight.shape
        saved += n * k * 4 - n * (c * 4 + (k + 7) // 8)
    dense, sparse = _file(tmp_path / "dense"), _file(tmp_path / "sparse")
    assert abs((dense - sparse) - saved) < 4096
    assert sparse < 0.75 * dense  # stories260K: the unpruned embedding (and norms) stay dense

    # greedy generation (KV cache, the fused decode step) gives the same tokens
    assert _greedy(back, ids[0].tolist()) == _greedy(model, ids[0].tolist())

    # memory="sparse": values + indices in memory, same logits to float rounding, saves the same file
    set_memory_(back, "sparse")
    assert all(not isinstance(m, SparseStoredLinear) for m in back.modules())
    assert torch.allclose(_logits(back, ids), ref, atol=1e-4, rtol=1e-4)
    save(back, tok, tmp_path / "sparse2")
    assert _file(tmp_path / "sparse2") == sparse
    again, _ = load(tmp_path / "sparse2")
    assert any(isinstance(m, SparseLinear) for m in again.modules())
    one = ids[:1, :1]  # one row: the CSR matrix-vector path
    assert torch.allclose(_logits(again, one), _logits(model, one), atol=1e-4, rtol=1e-4)
    set_memory_(again, "dense")
    assert torch.equal(_logits(again, ids), ref)


def _greedy(model, prompt: list[int], n: int = 12) -> list[int]:
    return [step[0] for step in decode(model, [prompt], n, SamplingParams())]


def test_bf16_reloads_identical(stories, tmp_path):
    model, tok = load(stories, dtype="bfloat16")
    apply(model, [Magnitude(sparsity=0.5), SparseStorage()], progress=False)
    save(model, tok, tmp_path / "s")
    back, _ = load(tmp_path / "s", dtype="bfloat16")
    assert next(m for m in back.modules() if isinstance(m, SparseStoredLinear)).weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def test_int8_codes_stored_sparse(stories, tmp_path):
    model, tok = load(stories)
    apply(model, [Magnitude(sparsity=0.5), Int8WeightOnly(), SparseStorage()], progress=False)
    assert any(isinstance(m, SparseStoredInt8Linear) for m in model.modules())
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    save(model, tok, tmp_path / "s")
    back, _ = load(tmp_path / "s")
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    with pytest.raises(LeanformerError, match="int8"):
        set_memory_(back, "sparse")


def test_bad_configs_fail_in_one_line(tiny_lm):
    with pytest.raises(LeanformerError, match="memory must be 'dense' or 'sparse'"):
        apply(tiny_lm, SparseStorage(memory="disk"))
    with pytest.raises(LeanformerError, match="no targeted Linear has enough zeros"):
        apply(tiny_lm, SparseStorage())
    assert isinstance(QuantConfig.from_dict({"type": "SparseStorage", "memory": "sparse"}), SparseStorage)
    with pytest.raises(LeanformerError, match="no SparseStorage stage"):
        set_memory_(tiny_lm, "sparse")


def test_quantized_forms_it_cannot_pack_are_named(tiny_lm):
    """int4 (or Int8Dynamic) weights: the one line says which form and where SparseStorage goes instead."""
    from leanformer.compress.config import Int4WeightOnly

    apply(tiny_lm, [Magnitude(sparsity=0.5), Int4WeightOnly(group_size=32)], progress=False)
    with pytest.raises(LeanformerError, match="the targets are Int4Linear: put SparseStorage on int8") as e:
        apply(tiny_lm, SparseStorage())
    assert "\n" not in str(e.value)
