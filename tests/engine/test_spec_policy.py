"""Prompt lookup's draft policy: the longest-suffix index against a brute-force scan, the cost-model
policy drafting only where it pays, the calibrated verification costs, and the fast argmax."""

from __future__ import annotations

import pytest
import torch

from leanformer.engine.ngram import SuffixIndex
from leanformer.engine.sampling import greedy_tokens
from leanformer.engine.spec_policy import (
    CAP,
    LOOKUP_PRIOR,
    DraftPolicy,
    LookupPolicy,
    draft_cost,
    verify_costs,
)
from leanformer.engine.verify import fast_argmax, greedy_accept

pytestmark = pytest.mark.usefixtures("one_thread")


def _longest(seq: list[int], cap: int) -> int:
    """Brute force: the longest suffix of seq (up to cap) that also ends earlier, with a token after it."""
    best = 0
    for end in range(len(seq) - 1):
        n = 0
        while n < cap and end - n >= 0 and seq[end - n] == seq[len(seq) - 1 - n]:
            n += 1
        best = max(best, n)
    return best


def test_suffix_index_finds_the_longest_recent_match():
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 4, (400,), generator=gen).tolist()  # small alphabet: many repeats
    index = SuffixIndex(3, 1, cap=8)
    for i, t in enumerate(seq):
        index.extend([t])
        drafts, n = index.propose_longest(5)
        text, longest = seq[: i + 1], _longest(seq[: i + 1], 8)
        # the longest match below ngram (3), at least ngram tokens above it (only RECENT starts compared)
        assert n == longest if longest < 3 else 3 <= n <= longest
        if n == 0:
            assert drafts == []
            continue
        assert any(  # the drafts are what followed an earlier match of those n tokens
            text[e + 1 - n : e + 1] == text[-n:] and text[e + 1 : e + 1 + 5] == drafts
            for e in range(n - 1, len(text) - 1)
        )


def test_suffix_index_prefers_the_longer_match_over_the_later_one():
    # "1 2 3" occurs after "9 9" (a 5-token match with the end) and later after "7 7" (3 tokens only)
    seq = [9, 9, 1, 2, 3, 40, 41, 7, 7, 1, 2, 3, 50, 9, 9, 1, 2, 3]
    index = SuffixIndex(3, 1)
    index.extend(seq)
    assert index.propose_longest(2) == ([40, 41], 5)
    assert index.propose(2) == ([50, 9], 3)  # NgramIndex: the latest 3-gram, whatever came before


def test_lookup_policy_drafts_only_where_it_pays():
    costs = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6]  # a forward of m rows, in one-row steps
    p = LookupPolicy(8, costs)
    assert p.draft_len(3, 8) == 1  # prior 1 in 2: E(1) = 1.5 / 1.2 beats 1, E(2) = 1.75 / 1.4 does not
    for _ in range(30):
        p.round(3, 8, 8)  # long matches always kept
    assert p.draft_len(3, 8) == 8
    assert p.draft_len(3, 2) == 2  # never more than the match offers
    for _ in range(30):
        p.observe(1, False)  # 1-token matches never kept
    assert p.draft_len(1, 8) == 0
    assert p.fallbacks == 1
    p.round(1, 1, 0)
    assert p.alpha(1) < 0.1 and p.alpha(CAP + 5) == p.alpha(CAP)


def test_lookup_policy_prior_by_match_length():
    """Before any evidence: no draft after a 1-token match, drafts after long ones (flat 1 in 2 by default)."""
    costs = [1.0, 1.13, 1.32, 1.6, 1.87, 2.23, 2.59, 2.95, 3.31]  # SmolLM2 int4, AVX2, 1 thread
    p = LookupPolicy(8, costs, LOOKUP_PRIOR)
    assert p.alpha(1) == pytest.approx(0.3) and p.alpha(2) == pytest.approx(0.6)
    assert p.alpha(3) == p.alpha(CAP) == pytest.approx(0.8)
    # 2 rows cost 1.13 steps: one draft at 30% already pays (1.3 / 1.13), more only after longer matches
    assert p.draft_len(1, 8) == 1 and p.draft_len(5, 8) == 2
    assert LookupPolicy(8, costs).alpha(1) == 0.5 == LookupPolicy(8, costs).alpha(CAP)


def test_lookup_policy_counts_each_draft_at_its_own_match_length():
    p = LookupPolicy(8, [1.0] * 9)
    p.round(2, 4, 1)  # draft 0 kept at L = 2, draft 1 rejected at L = 3, drafts 2..3 never judged
    assert p.counts[2] == [0.9 * 1 + 1, 0.9 * 2 + 1]
    assert p.counts[3] == [0.9 * 1, 0.9 * 2 + 1]
    assert p.counts[4] == [1.0, 2.0]


def test_verify_costs_are_calibrated_once_and_non_decreasing(shared):
    import leanformer as lf

    model, _ = lf.load(shared / "models" / "stories260K")
    costs = verify_costs(model, 6, repeats=2)
    assert len(costs) == 6 and costs[0] == 1.0
    assert all(a <= b for a, b in zip(costs, costs[1:]))
    assert verify_costs(model, 4) == costs[:4]  # cached on the model: not timed again
    assert len(model._verify_costs) == 1


def test_greedy_tokens_numpy_path_matches_torch_argmax():
    """greedy_tokens takes numpy's argmax on CPU fp32: the same first maximum as torch's, a NaN row
    cleaned, strided input, and the torch path for other dtypes."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=gen)
    logits[1, 7] = logits[1, 9] = 100.0  # a tie: the first maximum, as torch's argmax
    expected = logits.argmax(-1)
    logits[3, 4] = float("nan")  # a NaN row goes through the cleaning: NaN is not picked
    expected[3] = torch.nan_to_num(logits[3], nan=-float("inf")).argmax()
    assert greedy_tokens(logits).tolist() == expected.tolist()
    assert fast_argmax(logits) == expected.tolist()
    assert greedy_tokens(logits.double()).tolist() == expected.tolist()
    strided = torch.randn(1000, 5, generator=gen).t()  # [5, 1000], not contiguous
    assert greedy_tokens(strided).tolist() == strided.argmax(-1).tolist()


def test_greedy_accept_checks_the_gap_of_every_row_it_keeps():
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 3.0, 2.9995], [0.0, 0.0, 4.0]])
    assert greedy_accept(logits, [1, 1], margin=1e-3) == (1, None)  # row 1's top two tie
    assert greedy_accept(logits, [1, 1], margin=0.0) == (2, 2)
    assert greedy_accept(logits, [0, 1], margin=1e-3) == (0, 1)


COSTS = [1.0, 1.1, 1.3, 1.6, 1.9]  # a verification forward of m rows, in one-row steps


def test_draft_policy_probes_at_once_then_spaces_rejected_probes():
    """An expensive draft (0.55 of a step) that is always wrong: one probe at once, then a rejected probe
    (wasting 0.55 + 1.1 - 1 = 0.65 steps) waits 0.65 / 1.5% = 44 plain steps, the next twice as long."""
    p = DraftPolicy(4, COSTS, 0.55)
    assert p.draft_len(100) == 1  # prior 1 in 2 does not pay (needs 0.65), but one probe learns
    p.round(1, 0)
    gaps = []
    for _ in range(2):
        gap = 1 + next(i for i in range(500) if p.draft_len(100) > 0)
        p.round(1, 0)
        gaps.append(gap)
    assert gaps == [44, 88] and p.fallbacks == 0  # never drafted beyond probes: no fall-back counted
    assert p.draft_len(0) == 0  # nothing left to emit: never a draft


def test_draft_policy_follows_a_kept_probe_and_drafts_when_it_pays():
    p = DraftPolicy(4, COSTS, 0.1)  # a cheap draft: the prior already pays for one draft
    assert p.draft_len(100) >= 1
    for _ in range(20):
        p.round(p.draft_len(100), 4) if p._drafting else None
        p.round(4, 4)
    assert p.draft_len(100) == 4 and p.draft_len(2) == 2  # always kept: as many as allowed
    for _ in range(60):
        p.round(4, 0)
    assert p.draft_len(100) == 0 and p.fallbacks == 1  # stopped paying: plain steps, probes
    p.round(1, 0)
    p2 = DraftPolicy(4, COSTS, 0.55)
    assert p2.draft_len(100) == 1
    p2.round(1, 1)  # the probe was kept (a gain): probe again at once
    assert p2.draft_len(100) == 1


def test_draft_cost_is_timed_once_per_target(shared):
    import leanformer as lf
    from leanformer.engine.speculative import early_exit

    model, _ = lf.load(shared / "models" / "stories260K")
    draft = early_exit(model, 2)
    cost = draft_cost(model, draft, repeats=2)
    # a ratio of two timings (a tiny model on a shared machine: no bound worth asserting but > 0)
    assert cost > 0 and draft_cost(model, draft) == cost and len(draft._draft_costs) == 1


def test_draft_policy_never_runs_a_draft_that_cannot_pay():
    """A draft as dear as the target (SmolLM2 int4 for its fp32 dequantization on AVX2) never pays, even
    always right: no probe at all. One that pays only at high survival follows a kept probe after a wait."""
    p = DraftPolicy(4, COSTS, 1.0)
    assert all(p.draft_len(100) == 0 for _ in range(300))
    p = DraftPolicy(4, COSTS, 0.95)  # 4 drafts always kept: 5 tokens for 3.8 + 1.9 steps: never pays
    assert p.hopeless
    p = DraftPolicy(4, COSTS, 0.7)  # kept probes cost 0.7 + 1.1 = 1.8 steps for 2 tokens: a gain
    assert p.draft_len(100) == 1
    p.round(1, 1)
    assert p.draft_len(100) >= 1
    p = DraftPolicy(4, [1.0, 1.5, 1.6, 1.7, 1.8], 0.6)  # a kept probe costs 2.1 steps: 0.1 / 1.5% = 7
    assert p.draft_len(100) == 1
    p.round(1, 1)
    assert 1 + next(i for i in range(100) if p.draft_len(100) > 0) == 7
