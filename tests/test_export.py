"""ONNX export of encoders: parity report, dynamic axes, and the ONNX Runtime runner behind embed/classify."""

from __future__ import annotations

import pytest
import torch

from leanformer.encoders import classify, embed, load_encoder, train_probe
from leanformer.errors import LeanformerError
from tests.encoder_helpers import SENTENCES, need_minilm, tiny_encoder_dir

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from leanformer.export import OrtEncoder, export_onnx, load_onnx_encoder  # noqa: E402


@pytest.mark.parametrize(
    ("arch", "dynamo"),
    [("BertForSequenceClassification", True), ("RobertaModel", False), ("DistilBertModel", False)],
)
def test_export_parity_and_dynamic_axes(tmp_path, arch, dynamo):
    model, tok = load_encoder(tiny_encoder_dir(tmp_path / "m", arch, pooling=["mean"], normalize=True))
    report = export_onnx(model, tmp_path / "onnx", tok, dynamo=dynamo)
    want = {"last_hidden_state", "sentence_embedding"} | ({"logits"} if "Sequence" in arch else set())
    assert set(report["max_abs_diff"]) == want
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner = OrtEncoder(report["path"])
    for b, t in [(1, 3), (5, 17)]:  # shapes other than the traced [3, T]
        ids = torch.randint(5, model.args.vocab_size, (b, t))
        mask = torch.ones_like(ids)
        mask[-1, 2:] = 0
        ids[mask == 0] = model.args.pad_token_id
        with torch.inference_mode():
            assert (runner.embed(ids, mask) - model.embed(ids, mask)).abs().max() < 1e-4
            assert (runner(ids, mask)[mask.bool()] - model(ids, mask)[mask.bool()]).abs().max() < 1e-4


def test_onnx_backend_runs_embed_and_probe_classify(tmp_path):
    model, tok = load_encoder(tiny_encoder_dir(tmp_path / "m", "BertModel", pooling=["mean"], normalize=True))
    train_probe(model, tok, SENTENCES, ["pos", "neg", "neg", "pos", "neg", "pos", "pos"])
    export_onnx(model, tmp_path / "onnx", tok, dynamo=False)
    runner, rtok = load_onnx_encoder(tmp_path / "onnx")
    assert runner.args.probe_labels == ["neg", "pos"]
    assert abs(embed(runner, rtok, SENTENCES) - embed(model, tok, SENTENCES)).max() < 1e-5
    assert [c["label"] for c in classify(runner, rtok, SENTENCES)] == [
        c["label"] for c in classify(model, tok, SENTENCES)
    ]


def test_export_errors(tmp_path):
    with pytest.raises(LeanformerError, match="ONNX file not found"):
        OrtEncoder(tmp_path / "missing.onnx")
    model, _ = load_encoder(tiny_encoder_dir(tmp_path / "m", "BertModel"), dtype=torch.bfloat16)
    with pytest.raises(LeanformerError, match="float32"):
        export_onnx(model, tmp_path / "onnx")


@pytest.mark.slow
def test_real_minilm_export(tmp_path):
    model, tok = load_encoder(need_minilm())
    report = export_onnx(model, tmp_path, tok)
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner, rtok = load_onnx_encoder(tmp_path)
    assert abs(embed(runner, rtok, SENTENCES) - embed(model, tok, SENTENCES)).max() < 1e-5
