"""Windowed perplexity protocol, KLD and agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import leanformer as lf
from leanformer.evaluate import evaluate, windows


def test_windows_protocol_counts():
    # PERF-FACTS protocol: 15,188 tokens, 512-token non-overlapping windows → 29 windows, 14,819 scored
    spans = windows(15188, 512, 512)
    assert len(spans) == 29 and sum(512 - first for _, first in spans) == 14819


def test_perplexity_matches_manual(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, ids, window=32, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 100 - 32 + 1, 32):
            w = ids[s : s + 32]
            lp = F.log_softmax(model(w[None])[0, :-1], -1)
            nll -= lp.gather(-1, w[1:, None]).sum().item()
            n += 31
    assert result.scored_tokens == n == 93
    assert math.isclose(result.perplexity, math.exp(nll / n), rel_tol=1e-6)


def test_strided_windows_score_each_token_once(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    ids = torch.randint(0, 128, (96,))
    result = evaluate(model, ids, window=32, stride=16, progress=False)
    assert result.scored_tokens == 31 + 16 * 4  # every token after the first scored exactly once


def test_kld_against_itself_is_zero(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    ids = torch.randint(0, 128, (64,))
    r = evaluate(model, ids, window=32, reference=model, progress=False)
    assert r.kld == pytest.approx(0, abs=1e-6) and r.top1_agreement == 1.0


def test_too_little_data(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    with pytest.raises(lf.LeanformerError, match="fewer than one window"):
        evaluate(model, list(range(10)), window=32, progress=False)
