"""Unstructured / N:M weight pruning of encoders (encoders/prune_weights.py, `leanformer prune-weights`):
each block Linear hits the requested sparsity or pattern while the head stays dense, calibration
batches hold no padding, low sparsity keeps MiniLM's embeddings close, and a pruned (+ int8, + sparse
storage) encoder saves and reloads to the same embeddings in a smaller file."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from leanformer.compress.config import Int8Dynamic, Int8WeightOnly, Magnitude, PruneFFN, SparseGPT, Wanda
from leanformer.compress.recipe import quantize_
from leanformer.compress.sparse import SparseStorage
from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import embed
from leanformer.encoders.prune_weights import check_pattern, encoder_calibration, prune_weights_
from leanformer.errors import LeanformerError
from tests.encoders.helpers import SENTENCES, need_glue, need_minilm, tiny_encoder_dir

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = [f"{a} {b}" for a in SENTENCES for b in SENTENCES[:4]]  # 28 texts of several lengths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_encoder_dir(
        tmp_path_factory.mktemp("enc"), "BertForSequenceClassification", pooling=["mean"]
    )
    return load_encoder(folder, fast=False)


def test_calibration_batches_hold_no_padding(tiny):
    model, tok = tiny
    batches = encoder_calibration(model, tok, CALIB)
    assert sum(b.shape[0] for b in batches) == len(CALIB)
    assert len({b.shape[1] for b in batches}) == len(batches) > 1  # one tensor per token count
    pad = tok.pad_token_id
    assert all(not bool((b == pad).any()) for b in batches)
    assert all(bool((b[:, 0] == tok.cls_token_id).all()) for b in batches)  # tokenized as embed() does


@pytest.mark.parametrize(
    "cfg",
    [Magnitude(sparsity=0.5), Wanda(sparsity=0.3), SparseGPT(sparsity=0.5), Wanda(pattern="2:4"),
     SparseGPT(pattern="4:8"), Magnitude(pattern="2:4")],
    ids=lambda c: f"{type(c).__name__}-{c.pattern}-{c.sparsity}",
)  # fmt: skip
def test_every_block_linear_hits_sparsity_and_pattern(tiny, cfg):
    model, tok = tiny
    m = copy.deepcopy(model)
    head = m.head.dense.weight.clone()
    zeros = prune_weights_(m, tok, CALIB, cfg, progress=False)
    assert sorted(zeros) == sorted(
        f"layers.{i}.{n}" for i in range(2) for n in ("qkv", "attn_out", "ffn_in", "ffn_out")
    )
    for name in zeros:
        w = m.get_submodule(name).weight
        per_row = (w == 0).float().mean(1)  # every row pruned to the same share
        assert torch.allclose(per_row, torch.full_like(per_row, cfg.sparsity), atol=1 / w.shape[1]), name
        assert check_pattern(w, cfg.pattern), name
    assert torch.equal(m.head.dense.weight, head)  # the task head is not a default target
    assert m.config["leanformer"]["recipe"]["stages"][-1]["targets"] == ["layers.*"]


def test_bad_configs_fail_before_work(tiny):
    model, tok = tiny
    with pytest.raises(LeanformerError, match="needs calibration texts"):
        prune_weights_(copy.deepcopy(model), tok, None, Wanda())
    with pytest.raises(LeanformerError, match="prune_encoder_"):
        prune_weights_(copy.deepcopy(model), tok, CALIB, PruneFFN())
    with pytest.raises(LeanformerError, match="non-empty strings"):
        encoder_calibration(model, tok, ["ok", ""])
    with pytest.raises(LeanformerError, match="pattern 2:4 means sparsity"):
        prune_weights_(copy.deepcopy(model), tok, CALIB, Wanda(sparsity=0.3, pattern="2:4"))
    assert check_pattern(torch.tensor([[1.0, 0, 0, 2]]), "2:4")
    assert not check_pattern(torch.tensor([[1.0, 3, 0, 2]]), "2:4")


@pytest.mark.parametrize("int8", [None, Int8WeightOnly(), Int8Dynamic()], ids=["fp32", "int8-w", "int8-dyn"])
def test_pruned_int8_sparse_storage_saves_and_reloads(tiny, tmp_path, int8):
    from leanformer.loading import load, save

    model, tok = tiny
    m = copy.deepcopy(model)
    prune_weights_(m, tok, CALIB, Wanda(sparsity=0.5), progress=False)
    if int8 is not None:
        quantize_(m, int8, progress=False)
    if not isinstance(int8, Int8Dynamic):  # sparse storage packs float or int8-weight codes
        quantize_(m, SparseStorage(), progress=False)
    want = embed(m, tok, SENTENCES)
    save(m, tok, tmp_path / "m")
    back, btok = load(tmp_path / "m")
    np.testing.assert_allclose(embed(back, btok, SENTENCES), want, atol=1e-6)
    if int8 is None:  # float zeros packed: the zeros come back, in a smaller file than the dense save
        assert float((back.layers[0].qkv.weight == 0).float().mean()) == 0.5
        save(model, tok, tmp_path / "dense")
        size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("m", "dense")}
        assert size["m"] < size["dense"]


def test_cli_prune_weights_end_to_end(tiny, tmp_path, capsys):
    from leanformer.cli.main import main
    from leanformer.loading import save

    model, tok = tiny
    save(model, tok, tmp_path / "in")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    argv = ["prune-weights", str(tmp_path / "in"), "--method", "sparsegpt", "--pattern", "2:4"]
    assert (
        main([*argv, "--calibration", str(calib), "--sparse-storage", "--output", str(tmp_path / "o")]) == 0
    )
    assert "50.0% of their weights zero" in capsys.readouterr().out
    back, _ = load_encoder(tmp_path / "o", fast=False)
    assert check_pattern(back.layers[1].ffn_out.weight, "2:4")
    assert float((back.layers[1].ffn_out.weight == 0).float().mean()) == 0.5


def test_minilm_low_sparsity_keeps_embeddings_close():
    """Real weights: Wanda at 10% on 64 SST-2 train sentences keeps every STS-B sentence's embedding
    within cosine 0.99 of the dense model's (measured: mean 0.9991, min 0.9985)."""
    from leanformer.encoders.quality import read_tsv

    model, tok = load_encoder(need_minilm())
    texts = [r["sentence"] for r in read_tsv(need_glue("sst2", "train"), 64)]
    sentences = [r["sentence1"] for r in read_tsv(need_glue("stsb"), 200)]
    dense = embed(model, tok, sentences, normalize=True)
    zeros = prune_weights_(model, tok, texts, Wanda(sparsity=0.1), progress=False)
    assert len(zeros) == 24 and all(abs(z - 0.1) < 0.002 for z in zeros.values())
    cos = (embed(model, tok, sentences, normalize=True) * dense).sum(1)
    assert cos.min() > 0.99 and cos.mean() > 0.997
