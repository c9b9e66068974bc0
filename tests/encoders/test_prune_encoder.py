"""Structured encoder pruning (encoders/prune_encoder.py): channels really removed (equal to zeroing
them in the unpruned model), the budget met with kernel-friendly widths, the refit closer to the
unpruned model than plain removal, and the pruned model saved, reloaded and exported like any other."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import embed
from leanformer.encoders.prune_encoder import block_params, prune_encoder_, prune_ffn_
from leanformer.errors import LeanformerError
from tests.encoders.helpers import SENTENCES, need_glue, need_minilm, tiny_encoder_dir

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = [f"{a} {b} {c}" for a in SENTENCES for b in SENTENCES[:3] for c in ("fun", "dull")]  # 42 texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_encoder_dir(tmp_path_factory.mktemp("enc"), "BertModel", pooling=["mean"])
    return load_encoder(folder, fast=False)


def test_prune_ffn_equals_zeroing_the_channels(tiny):
    model, tok = tiny
    keep = torch.arange(0, 96, 2)  # half of the 96 channels of each layer
    handles = []
    for layer in model.layers:
        zero = torch.ones(96)
        zero[1::2] = 0

        def hook(_mod, inputs, zero=zero):
            return (inputs[0] * zero,)

        handles.append(layer.ffn_out.register_forward_pre_hook(hook))
    want = embed(model, tok, SENTENCES)
    for h in handles:
        h.remove()
    pruned = prune_ffn_(copy.deepcopy(model), {0: keep, 1: keep})
    assert [layer.ffn_in.weight.shape[0] for layer in pruned.layers] == [48, 48]
    assert pruned.config["intermediate_sizes"] == [48, 48]
    np.testing.assert_allclose(embed(pruned, tok, SENTENCES), want, atol=1e-5)
    with pytest.raises(LeanformerError, match="must be distinct"):
        prune_ffn_(copy.deepcopy(model), {0: [0, 0, 1]})


def test_budget_widths_refit_save_reload_export(tiny, tmp_path):
    from leanformer.export.encoder import export_onnx, load_onnx_encoder
    from leanformer.loading import save

    model, tok = tiny
    dense = embed(model, tok, SENTENCES)
    before = block_params(model)["total"]
    out = {}
    for refit in (True, False):
        m = copy.deepcopy(model)
        r = prune_encoder_(m, tok, CALIB, 0.3, multiple=16, method="norm", steps=1, refit=refit)
        assert r["removed_fraction"] >= 0.3 and r["block_params_before"] == before
        assert all(w % 16 == 0 for w in r["intermediate_sizes"]) and sum(r["heads_per_layer"]) < 8
        assert block_params(m)["total"] == r["block_params_after"]  # really smaller matrices
        out[refit] = (m, embed(m, tok, SENTENCES))
    cos = {
        k: float(
            (e * dense).sum(1).mean() / (np.linalg.norm(e, axis=1) * np.linalg.norm(dense, axis=1)).mean()
        )
        for k, (_, e) in out.items()
    }
    assert cos[True] > cos[False]  # the least-squares refit keeps the embeddings closer to the unpruned
    pruned, want = out[True]
    save(pruned, tok, tmp_path / "saved")
    again, _ = load_encoder(tmp_path / "saved", fast=False)
    assert [layer.ffn_in.out_features for layer in again.layers] == pruned.config["intermediate_sizes"]
    np.testing.assert_allclose(embed(again, tok, SENTENCES), want, atol=1e-6)
    report = export_onnx(again, tmp_path / "onnx", tok, dynamo=False)
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner, _ = load_onnx_encoder(tmp_path / "onnx")
    np.testing.assert_allclose(embed(runner, tok, SENTENCES), want, atol=1e-4)


def test_bad_settings(tiny):
    model, tok = tiny
    for kw, fragment in [
        (dict(fraction=1.0), "fraction must be in"),
        (dict(fraction=0.3, head_fraction=-0.5), "head_fraction must be in"),
        (dict(fraction=0.3, multiple=0), "multiple must be"),
        (dict(fraction=0.9, head_fraction=0.0, multiple=64), "leaves under 64 FFN channels"),
    ]:
        with pytest.raises(LeanformerError, match=fragment):
            prune_encoder_(copy.deepcopy(model), tok, CALIB, **kw)
    with pytest.raises(LeanformerError, match="needs calibration texts"):
        prune_encoder_(copy.deepcopy(model), tok, [], 0.3)


@pytest.mark.slow
def test_real_minilm_30_percent(tmp_path):
    """all-MiniLM-L6-v2, 30% of the block weights: measured STS-B drop (see BENCHMARKS); reloads."""
    from leanformer.encoders.quality import eval_stsb, glue_path, read_tsv

    need_glue("stsb"), need_glue("sst2", "train")
    model, tok = load_encoder(need_minilm())
    base = eval_stsb(model, tok)["stsb_spearman"]
    calib = [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), 512)]
    r = prune_encoder_(model, tok, calib, 0.3)
    assert r["removed_fraction"] >= 0.3
    assert eval_stsb(model, tok)["stsb_spearman"] > base - 0.01  # measured -0.0034 (heads 15%, refit)


def test_cli_prune_encoder_and_long_embed(tmp_path, capsys):
    from leanformer.cli.main import main

    folder = tiny_encoder_dir(tmp_path / "enc", "BertModel", pooling=["mean"])
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    out = tmp_path / "pruned"
    argv = ["prune-encoder", str(folder), "--calibration", str(calib), "--multiple", "16", "--method", "norm"]
    assert main([*argv, "--steps", "1", "--output", str(out)]) in (0, None)
    assert "of the block weights" in capsys.readouterr().out
    model, _ = load_encoder(out, fast=False)
    assert sum(model.args.heads_per_layer) < 8 and all(w % 16 == 0 for w in model.args.intermediate_sizes)
    texts = tmp_path / "texts.txt"
    texts.write_text(" ".join(SENTENCES * 3) + "\n" + SENTENCES[0] + "\n")
    npy = tmp_path / "e.npy"
    argv = ["embed", str(out), "--input", str(texts), "--output", str(npy), "--attention", "local"]
    assert main([*argv, "--window", "8", "--max-length", "80", "--positions", "repeat"]) in (0, None)
    e = np.load(npy)
    assert e.shape == (2, 64) and np.isfinite(e).all()
