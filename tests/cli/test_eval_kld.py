"""`leanformer eval --reference` on two different models: the printed/JSON KLD and top-1 are the
protocol's KL(reference ‖ model) and argmax agreement (tests/test_cli.py only evaluates a model
against itself, where any KLD formula gives 0 and any agreement 100%)."""

from __future__ import annotations

import json

import pytest

import leanformer as lf
from leanformer.cli.main import main
from leanformer.measure.evaluate import read_text, tokenize
from tests.measure.test_evaluate import _by_hand


def test_eval_cli_kld_int4_against_fp32_stories260k(shared, tmp_path, capsys):
    import torch

    original = shared / "models/stories260K"
    data = shared / "data/tinystories/sample.txt"
    model, tok = lf.load(original)
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32, pad=True))
    saved = lf.save(model, tok, tmp_path / "int4")
    out = tmp_path / "r.json"
    args = ["eval", str(saved), "--data", str(data), "--window", "256", "--max-chars", "2000"]
    assert main([*args, "--reference", str(original), "--json", str(out)]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    r = json.loads(out.read_text())
    reference, _ = lf.load(original)
    ids = torch.tensor(tokenize(tok, read_text(data, 2000)))
    kld, top1, n = _by_hand(model, reference, ids, 256, 256)
    assert r["scored_tokens"] == n and 1e-3 < kld < 0.5  # int4 g32 on a 260K model: a real, small gap
    assert r["kld"] == pytest.approx(kld, rel=1e-3)
    assert 0.5 < top1 < 1 and r["top1_agreement"] == pytest.approx(top1, abs=1e-9)
