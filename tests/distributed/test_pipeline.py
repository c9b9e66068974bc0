"""Pipeline parallel on 2 local ranks (gloo): the layers split across ranks give the one-process model's
logits (the same arithmetic, in the same order: bit for bit) and greedy tokens, batches run as
micro-batches included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanformer.distributed.pipeline import _row_spans, pipeline_
from leanformer.errors import LeanformerError
from tests.distributed.ranks import load_as, outputs, run_ranks


def test_two_stages_match_one_process(tiny_dirs, shared, tmp_path):
    models = {
        "llama": (str(tiny_dirs["llama"]), [1, 1]),  # 2 layers: one per rank
        "qwen2": (str(tiny_dirs["qwen2"]), [1, 1]),
        "stories260K": (str(shared / "models" / "stories260K" / "stories260K.bin"), [3, 2]),
    }
    jobs = [(name, path, "float32", "pp") for name, (path, _) in models.items()]
    results = run_ranks(2, jobs, tmp_path / "out")
    for name, (path, layers) in models.items():
        ref = outputs(load_as(path))
        for rank, got in enumerate(results[name]):
            assert "error" not in got, got.get("error")
            assert torch.equal(got["full"], ref["full"]), name
            assert (got["step"] - ref["step"]).abs().max() < 1e-4  # fused C++ step vs module path
            assert got["greedy"] == ref["greedy"]
            assert got["cache_layers"] == layers[rank]  # each rank caches only its own layers
            # three rows as two micro-batches (the default: one per stage), with and without a cache:
            # each row's math is the same, but a GEMM over 2 rows may block its sums other than over 3
            assert (got["batch_full"] - ref["batch_full"]).abs().max() < 1e-5, name
            assert (got["batch_step"] - ref["batch_step"]).abs().max() < 1e-4


def test_pipeline_without_process_group_is_one_line():
    with pytest.raises(LeanformerError, match="process group"):
        pipeline_(nn.Linear(2, 2))


def test_micro_batches_cover_every_row_once():
    assert _row_spans(3, 2) == [slice(0, 2), slice(2, 3)]
    assert _row_spans(1, 4) == [slice(0, 1)]  # one row: nothing to split
    assert _row_spans(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
