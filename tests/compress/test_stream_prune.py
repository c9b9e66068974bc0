"""Streaming compression of pruning / low-rank recipes (compress/stream_prune.py): bit for bit the
in-memory result on stories260K, a quantization stage after the calibrated one, several calibrated
stages (one walk each, layers parked in between), PruneHeads, PruneLayers (a scoring walk, then the
kept layers), SparseStorage packed after the walk and saved, and one-line refusals for what cannot
stream."""

from __future__ import annotations

import copy

import pytest
import torch

import leanformer as lf
from leanformer.compress import apply
from leanformer.compress.config import (
    LowRank,
    Magnitude,
    PruneFFN,
    PruneHeads,
    PruneLayers,
    SparseGPT,
    Wanda,
)
from leanformer.compress.lowrank import LowRankLinear
from leanformer.compress.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly
from leanformer.compress.sparse import SparseStorage
from leanformer.compress.stream import compressed_bytes, plan_stages, state_bytes
from leanformer.errors import LeanformerError

pytestmark = pytest.mark.usefixtures("one_thread")

INT4 = Int4WeightOnly(group_size=32, pad=True)
HEAD_INT8 = Int8WeightOnly(
    targets=["lm_head"], ignore=[]
)  # rounded by rows from the file (tied table)  # stories260K's FFN width 172 is no multiple of 32
RECIPES = {
    "magnitude-2:4+int4": [Magnitude(pattern="2:4"), INT4],
    "wanda-50+int4": [Wanda(sparsity=0.5), INT4],
    "sparsegpt-2:4": [SparseGPT(pattern="2:4")],
    "svd-smaller+int8": [LowRank(ratio=0.5, multiple=8, keep="smaller"), Int8WeightOnly()],
    "plain-svd": [LowRank(ratio=0.4, multiple=8, keep="smaller", whiten=False)],
    "ffn-33+int4": [PruneFFN(sparsity=1 / 3), Int4WeightOnly(group_size=32)],
    "wanda-50+sparse": [Wanda(sparsity=0.5), SparseStorage()],
    # issue #12's remaining gaps: PruneHeads on the walk; two calibrated stages (two walks, the second
    # on the outputs of layers the first changed, as in memory); PruneLayers scored by a walk of its own
    "heads-50+int8": [PruneHeads(sparsity=1 / 2), Int8WeightOnly()],
    "wanda-50+gptq-int8": [Wanda(sparsity=0.5), GPTQ(bits=8)],
    "ffn-33+int8-head+awq-int8": [PruneFFN(sparsity=1 / 3), HEAD_INT8, AWQ(bits=8)],
    "drop-2+int8": [PruneLayers(n_layers=2), Int8WeightOnly()],
    "wanda-50+drop-1+gptq-int8+sparse": [
        Wanda(sparsity=0.5),
        PruneLayers(n_layers=1),
        GPTQ(bits=8),
        SparseStorage(),
    ],
}


def same(a: torch.nn.Module, b: torch.nn.Module, vocab: int) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [n for n in sa if not torch.equal(sa[n], sb[n])] == []
    assert a.config == b.config  # the recipe, FFN widths, head counts, number of layers
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(ids), b(ids))


def _both(path, recipe, calib):
    whole, _ = lf.load(path)
    apply(whole, copy.deepcopy(recipe), calib, progress=False)
    lazy, _ = lf.load(path, lazy=True)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # nothing read yet
    stages = copy.deepcopy(recipe)
    estimate = compressed_bytes(lazy, stages)
    apply(lazy, stages, calib, progress=False)
    return whole, lazy, estimate


@pytest.mark.parametrize("name", list(RECIPES))
def test_stories260k_pruning_streamed_equals_in_memory(shared, name):
    path = shared / "models/stories260K"
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    whole, lazy, estimate = _both(path, RECIPES[name], calib)
    same(whole, lazy, 512)
    if name.startswith("svd"):
        assert isinstance(lazy.model.layers[0].mlp.down_proj, LowRankLinear)
    if name.startswith("ffn"):
        assert lazy.model.layers[0].mlp.inter == 128
    # upper bounds: SparseStorage's capacities come from the pruned weights (the dense size is counted),
    # and whether AWQ keeps a Linear's input scale depends on the data (counted for every target)
    if name.endswith("sparse") or "awq" in name:
        assert estimate >= state_bytes(lazy)
    else:
        assert estimate == state_bytes(lazy)
    if name.startswith("heads"):
        assert lazy.model.layers[0].self_attn.n_heads == 4  # stories260K: 8 heads, 4 KV heads
    if "drop" in name:
        assert len(lazy.model.layers) == 5 - int(name.split("drop-")[1][0])


def test_streamed_sparse_storage_saves_and_reloads(shared, tmp_path):
    path = shared / "models/stories260K"
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    lazy, _ = lf.load(path, lazy=True)
    apply(lazy, [Wanda(sparsity=0.5), SparseStorage()], calib, progress=False)
    assert lazy.config["leanformer"]["recipe"]["stages"][-1]["capacity"]  # filled from the weights
    saved = lf.save(lazy, None, tmp_path / "out")
    again, _ = lf.load(saved)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(again(ids), lazy(ids))


def test_lowrank_faster_gate_runs_before_reading(shared):
    """keep="faster" is decided on random Linears of the load dtype before any weight is read: the
    kept-dense names join `ignore`, and a later stage's plan targets the modules that will exist."""
    lazy, _ = lf.load(shared / "models/stories260K", lazy=True)
    svd = LowRank(ratio=0.25, multiple=4)
    try:
        names = plan_stages(lazy, [svd, Int8WeightOnly()])
    except LeanformerError as e:  # on this CPU no shape may win: the in-memory message, before work
        assert "faster factorised" in str(e)
        return
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    assert set(names[0]).isdisjoint(svd.ignore)
    for n in names[0]:  # the int8 stage rounds the factors of each factorised Linear
        assert {f"{n}.up", f"{n}.down"} <= set(names[1])


def test_refusals_name_the_stage(shared):
    lazy, _ = lf.load(shared / "models/stories260K", lazy=True)
    for stages, words in (
        ([Wanda(sparsity=0.5), PruneLayers(n_layers=5)], "n_layers 5 must be below"),
        ([PruneHeads(heads=3)], "breaks the GQA ratio"),
        ([PruneHeads(sparsity=0.5), Int4WeightOnly(group_size=48)], "group"),
        ([Wanda(sparsity=0.5), SparseStorage(), Int8WeightOnly()], "SparseStorage"),
        ([Magnitude(sparsity=0.5, targets=["lm_head"], ignore=[])], "outside the decoder layers"),
        ([PruneFFN(sparsity=0.5, multiple=8), Int4WeightOnly(group_size=32)], "group"),
    ):
        with pytest.raises(LeanformerError, match=words) as e:
            plan_stages(lazy, stages)
        assert "\n" not in str(e.value)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # refused before any read


@pytest.mark.slow  # ~3-5 min on 2 loaded cores: the GGUF dequantized twice, 30 layers calibrated twice
def test_smollm2_wanda_int8_sparse_streamed_equals_in_memory(smollm2):
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = [Wanda(sparsity=0.5), Int8WeightOnly(), SparseStorage()]
    whole, _ = lf.load(smollm2, keep_quantized=False)
    apply(whole, recipe, calib, progress=False)
    lazy, _ = lf.load(smollm2, lazy=True)
    apply(lazy, [Wanda(sparsity=0.5), Int8WeightOnly(), SparseStorage()], calib, progress=False)
    same(whole, lazy, 49152)


def test_parked_layers_need_temp_space(shared, monkeypatch):
    """Two calibrated walks park the layers in the temporary directory: too little space there is one
    line before any weight is read."""
    import shutil

    from leanformer.compress import spill

    monkeypatch.setattr(spill.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 0))
    lazy, _ = lf.load(shared / "models/stories260K", lazy=True)
    calib = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LeanformerError, match="parks the decoder layers.*--in-memory") as e:
        apply(lazy, [Wanda(sparsity=0.5), GPTQ(bits=8)], calib, progress=False)
    assert "\n" not in str(e.value)
    assert all(p.is_meta for p in lazy.model.layers.parameters())


@pytest.mark.slow  # ~7 min on 2 loaded cores: 30 layers walked three times, and once more in memory
def test_smollm2_heads_drop_gptq_streamed_equals_in_memory(smollm2):
    """Three calibrated stages on real weights: PruneHeads, PruneLayers (scored by a walk of its own),
    GPTQ; the layers parked between the walks."""
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = [PruneHeads(sparsity=1 / 3), PruneLayers(n_layers=2), GPTQ(bits=8), HEAD_INT8]
    whole, _ = lf.load(smollm2, keep_quantized=False)
    apply(whole, copy.deepcopy(recipe), calib, progress=False)
    lazy, _ = lf.load(smollm2, lazy=True)
    apply(lazy, copy.deepcopy(recipe), calib, progress=False)
    assert len(lazy.model.layers) == 28 and lazy.model.layers[0].self_attn.n_heads == 6
    same(whole, lazy, 49152)


def test_layer_drop_plan_is_an_upper_bound_for_uneven_layers(shared):
    """PruneLayers' size plan (before the scoring walk says which layers go) drops the smallest layers:
    with layer 1 made smaller, dropping it is what the plan assumes, not dropping the last layer."""
    from leanformer.compress.stream_prune import plan_drop

    model, _ = lf.load(shared / "models/stories260K")
    mlp = model.model.layers[1].mlp
    mlp.down_proj = torch.nn.Linear(8, mlp.down_proj.out_features, bias=False)  # a narrower layer 1
    before = [sum(t.numel() for t in layer.state_dict().values()) for layer in model.model.layers]
    plan = copy.deepcopy(model)
    plan_drop(plan, PruneLayers(n_layers=1))
    after = [sum(t.numel() for t in layer.state_dict().values()) for layer in plan.model.layers]
    assert after == before[:1] + before[2:]  # the smallest went: any real choice leaves no more bytes
