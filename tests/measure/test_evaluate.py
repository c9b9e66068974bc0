"""Windowed perplexity protocol, KLD and agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import leanformer as lf
from leanformer.measure.evaluate import evaluate, windows


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


def _by_hand(model, reference, ids: torch.Tensor, window: int, stride: int) -> tuple[float, float, int]:
    """KL(reference ‖ model) per scored token and top-1 agreement, written out with torch.nn.functional
    on the same windows and scored positions as the protocol (not through evaluate())."""
    kl = agree = n = 0.0
    scored_until = 0
    with torch.no_grad():
        for s in range(0, len(ids) - window + 1, stride):
            first = max(1, scored_until - s)  # tokens an earlier window scored are not scored again
            scored_until = s + window
            w = ids[s : s + window][None]
            lp = F.log_softmax(model(w)[0, first - 1 : -1].float(), -1)
            rp = F.log_softmax(reference(w)[0, first - 1 : -1].float(), -1)
            kl += F.kl_div(lp, rp, log_target=True, reduction="sum").item()  # Σ p_ref (log p_ref − log p)
            agree += (lp.argmax(-1) == rp.argmax(-1)).sum().item()
            n += len(lp)
    return kl / n, agree / n, int(n)


@pytest.mark.parametrize("stride", [32, 12])
def test_kld_and_top1_match_an_independent_computation(tiny_dirs, stride):
    """Two different models: evaluate()'s KLD must be KL(reference ‖ model), not reversed or rescaled,
    and top-1 the real argmax agreement (the self-reference test above cannot tell any of that)."""
    reference, _ = lf.load(tiny_dirs["llama"])
    model, _ = lf.load(tiny_dirs["llama"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * p.std() * torch.randn(p.shape, generator=g))
        model.model.norm.weight.mul_(0.3)  # flatter distributions: KL is far from symmetric then
    ids = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(0))
    r = evaluate(model, ids, window=32, stride=stride, reference=reference, progress=False)
    kld, top1, n = _by_hand(model, reference, ids, 32, stride)
    reverse = _by_hand(reference, model, ids, 32, stride)[0]
    assert r.scored_tokens == n == {32: 93, 12: 91}[stride]
    assert kld > 0.02 and abs(reverse - kld) > 0.02 * kld  # a test that can tell the directions apart
    assert r.kld == pytest.approx(kld, rel=1e-4)
    assert 0.2 < top1 < 0.95 and r.top1_agreement == pytest.approx(top1, abs=1e-9)
    assert r.reference_perplexity == pytest.approx(
        evaluate(reference, ids, 32, stride, progress=False).perplexity
    )
