"""encoders_long's attention-alone timing (measure/bench/encoders_long.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from leanformer.measure.bench.encoders_long import bench_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_alone_reports_every_mode_against_dense():
    model = SimpleNamespace(args=SimpleNamespace(num_attention_heads=4, head_dim=16))  # all it reads
    modes = ["dense", "local w=128", "lsh b=64 x2", "dense, repeat positions", "chunks (trained limit)"]
    rows = bench_attention(model, [300], modes, repeats=1)["300"]
    assert list(rows) == ["dense", "local w=128", "lsh b=64 x2"]  # positions / chunks: not attention
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and all(r["ms"] > 0 for r in rows.values())
