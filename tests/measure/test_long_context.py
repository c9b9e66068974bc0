"""eval --long's measures (measure/long_context.py) on tiny models: the policies against full attention."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.measure.long_context import (
    decode_rate,
    needle_prompt,
    prompt_perplexity,
    run_window,
    stream_perplexity,
)
from leanformer.models.kv_policy import HeavyHitters, SinkWindow, SnapKV

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return lf.load(tiny_dirs["llama"])[0]


def ids(n: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_stream_matches_full_attention_while_the_window_holds_it(llama):
    x = ids(120)
    full = stream_perplexity(llama, x, None, "full", piece=16, fit=120, progress=False)
    window = stream_perplexity(llama, x, SinkWindow(4, 200), "window", piece=1, fit=120, progress=False)
    assert window.perplexity == pytest.approx(full.perplexity, rel=1e-4)
    assert window.fit_perplexity == pytest.approx(full.perplexity, rel=1e-4)


def test_run_window_reports_three_attentions_and_checkpoints(llama):
    rows, points, report = run_window(llama, ids(1100), SinkWindow(4, 32), piece=8, progress=False)
    assert [r[0] for r in rows] == ["sinks 4 + window 32", "window 32, no sinks", "full attention"]
    assert report["fit_tokens"] == 256 and [p[0] for p in points] == ["1000"]
    first = report["runs"][0]
    assert first["tokens"] == 1099 and first["cache_mb"] < report["runs"][2]["cache_mb"]
    assert first["checkpoints"][0]["tok_s"] > 0


def test_prompt_perplexity_full_budget_is_the_full_cache(llama):
    x = ids(400)
    full = prompt_perplexity(llama, x, None, 150, 40, 2, progress=False)
    assert prompt_perplexity(llama, x, HeavyHitters(190), 150, 40, 2, progress=False) == pytest.approx(
        full, rel=1e-4
    )
    squeezed = prompt_perplexity(llama, x, SnapKV(0.25), 150, 40, 2, progress=False)
    assert squeezed != full and squeezed > 1


def test_needle_prompt_holds_the_key_at_its_depth(shared):
    _, tok = lf.load(shared / "models" / "stories260K")
    p = needle_prompt(tok, 12345, 200, 0.5)
    text = tok.decode(p)
    assert "12345" in text and text.rstrip().endswith("The pass key is")
    assert 0.3 < text.index("12345") / len(text) < 0.7


def test_decode_rate_times_h2o_replays_on_the_fused_step(llama):
    x = ids(120)
    full = decode_rate(llama, x, None, 30)
    h2o = decode_rate(llama, x, HeavyHitters(30, sinks=2, chunk=8), 30)
    assert full["tok_s"] > 0 and full["replay_s"] == 0
    assert h2o["replay_s"] > 0 and h2o["kv_mb"] < full["kv_mb"]  # evicted 3 times, replayed first
