"""Per-layer diagnosis: the one badly quantized layer comes out on top, locally and end to end."""

from __future__ import annotations

import json

import pytest
import torch

import leanformer as lf
from leanformer.cli.main import main
from leanformer.compress import Int4WeightOnly, Int8WeightOnly, quantize_
from leanformer.errors import LeanformerError
from leanformer.measure.diagnose import per_layer_errors

BAD = "model.layers.1.mlp.down_proj"


def test_worst_layer_ranks_first(tiny_dirs):
    reference, _ = lf.load(tiny_dirs["llama"])
    model, _ = lf.load(tiny_dirs["llama"])
    quantize_(model, Int4WeightOnly(group_size=32, targets=[BAD]), progress=False)
    quantize_(model, Int8WeightOnly(), progress=False)  # everything else: int8, far more accurate
    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    rows = per_layer_errors(model, reference, windows, top=3, progress=False)
    assert len(rows) == 2 * 4  # 2 layers × (qkv, o, gate_up, down); lm_head is ignored by default
    assert rows[0].name == BAD and rows[0].kind == "Int4Linear"
    assert rows[0].kld_alone > rows[1].kld_alone > 0
    assert max(r.local_rel_error for r in rows) == rows[0].local_rel_error
    # the reference is left as it was
    assert all(type(m).__name__ not in ("Int4Linear", "Int8Linear") for m in reference.modules())


def test_uncompressed_model_is_a_clear_error(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    with pytest.raises(LeanformerError, match="no compressed layers"):
        per_layer_errors(model, model, torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_cli_per_layer(shared, tmp_path, capsys):
    stories = shared / "models/stories260K"
    q = tmp_path / "q"
    assert main(["compress", str(stories), "--recipe", "int8", "-o", str(q), "--no-speed"]) == 0
    out = tmp_path / "r.json"
    data = shared / "data/tinystories/sample.txt"
    args = ["eval", str(q), "--data", str(data), "--window", "128", "--max-chars", "20000"]
    assert main([*args, "--reference", str(stories), "--per-layer", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["per_layer"]
    assert rows and rows[0]["kld_alone"] > 0
    assert "ignore list" in capsys.readouterr().out


def test_cli_per_layer_without_reference_fails_before_evaluating(shared, capsys):
    data = shared / "data/tinystories/sample.txt"
    args = ["eval", str(shared / "models/stories260K"), "--data", str(data), "--per-layer"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "--reference" in captured.err and "perplexity" not in captured.out
