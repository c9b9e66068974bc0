"""The server's batch draft policy: allocate() finds the best drafts for the whole batch (against brute
force), never drafts where rows cost what tokens are worth, RequestDrafts' incremental index and free
checks, and the timed batch forward costs (engine/spec_chain.batch_costs)."""

from __future__ import annotations

import itertools

import pytest
import torch

import leanformer as lf
from leanformer.engine.ngram import SuffixIndex
from leanformer.engine.spec_batch_policy import RequestDrafts, allocate
from leanformer.engine.spec_chain import _layout, _line, batch_costs
from leanformer.engine.spec_policy import LOOKUP_PRIOR

pytestmark = pytest.mark.usefixtures("one_thread")


def _rate(offers, counts, plain, chained):
    k, b = sum(counts), len(offers)
    tokens = b + sum(sum(o[:c]) for o, c in zip(offers, counts))
    return tokens / (chained[b + k - 1] if k else plain[b - 1])


def test_allocate_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    plain = [1.0, 1.05, 1.1, 1.15]
    chained = [1.0 + 0.25 * (r - 1) ** 1.1 for r in range(1, 17)]  # ~SmolLM2 int4: compute bound past 1 row
    for _ in range(40):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        offers = []
        for _ in range(b):
            a = torch.rand(int(torch.randint(0, 4, (1,), generator=gen)), generator=gen)
            offers.append(torch.cumprod(a.sort(descending=True).values, 0).tolist())
        room = 16 - b
        got = allocate(offers, plain, chained, room)
        assert all(0 <= c <= len(o) for c, o in zip(got, offers)) and sum(got) <= room
        best = max(
            _rate(offers, c, plain, chained)
            for c in itertools.product(*[range(len(o) + 1) for o in offers])
            if sum(c) <= room
        )
        assert _rate(offers, got, plain, chained) == pytest.approx(best)


def test_allocate_drafts_only_where_it_pays():
    sure, weak = [0.99, 0.98, 0.97], [0.2, 0.04]
    cheap = [1.0 + 0.02 * r for r in range(16)]
    assert allocate([sure, weak], cheap[:2], cheap, 14) == [3, 1]  # a 20% draft pays at 2% a row
    dear = [1.0 + 0.6 * r for r in range(16)]
    assert allocate([sure, weak], [1.0, 1.6], dear, 14) == [3, 0]  # not at 60%
    assert allocate([weak, weak], [1.0, 1.6], dear, 14) == [0, 0]  # nothing pays: a plain step
    assert sum(allocate([sure, sure], cheap[:2], cheap, 3)) == 3  # room: the forward's row cap
    assert allocate([[0.52]], [1.0], [1.0, 1.5], 1, margin=0.0) == [1]
    assert allocate([[0.52]], [1.0], [1.0, 1.5], 1, margin=0.05) == [0]  # breaking even is not enough
    assert allocate([], [1.0], [1.0], 4) == []


def test_request_drafts_index_is_incremental_and_learns_for_free():
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 5, (60,), generator=gen).tolist()
    out = torch.randint(0, 5, (40,), generator=gen).tolist()
    st = RequestDrafts(4, 3, 1)
    for n in range(0, len(out) + 1, 3):  # tokens arrive a few at a time
        st.offer(prompt, out[:n], 4)
        fresh = SuffixIndex(3, 1)
        fresh.extend(prompt + out[:n])
        assert (st.found, st.match) == fresh.propose_longest(4)
    assert st.offer(prompt, out, 0) == [] and st.found == []  # no room: no lookup

    st = RequestDrafts(4, 2, 1)
    text = [1, 2, 3, 4, 1, 2]
    chances = st.offer(text, [], 4)
    assert st.found == [3, 4, 1, 2] and st.match == 2 and chances[0] == pytest.approx(LOOKUP_PRIOR[2])
    assert chances == sorted(chances, reverse=True)
    assert st.chosen(0, []) == ([], False)  # a plain step: lookup guessed 3
    before = st.policy.alpha(2)
    st.offer(text, [3], 4)  # ... and 3 it was
    assert st.policy.alpha(2) > before
    drafts, _ = st.chosen(2, [3])
    assert drafts == st.found[:2]
    st.verified(2, 0)  # both rejected: the survival at this match length falls
    assert st.chosen(0, [3])[1]  # drafting stopped: one fall-back


def test_layout_spreads_rows_over_slots():
    assert _layout(3, 4, 10) == ([0, 1, 2], [10, 10, 10])
    assert _layout(6, 4, 10) == ([0, 0, 1, 1, 2, 3], [10, 11, 10, 11, 10, 10])


def test_cost_line_smooths_a_dip():
    timed = {2: 1.5, 3: 2.06, 4: 2.06, 6: 2.27, 8: 3.9, 12: 5.09, 16: 8.92}  # SmolLM2, 2 threads, load 5
    costs = _line(timed, 16, 2, 0.05)
    assert costs[0] == 1.0 and all(costs[m - 1] >= c for m, c in timed.items())  # never below a timing
    steps = [b - a for a, b in zip(costs, costs[1:])]
    assert min(steps) > 0.24  # no row looks free (the line's slope is ~0.5 a row)
    assert _line({2: 1.0, 4: 1.0}, 5, 2, 0.05) == pytest.approx([1.0, 1.05, 1.1, 1.15, 1.2])  # the floor
    assert _line({}, 3, 2, 0.1) == pytest.approx([1.0, 1.1, 1.2])
    plain = {1: 1.0, 2: 1.14, 3: 1.1, 4: 1.58}  # plain steps: the medians (a dip errs towards plain)
    assert _line(plain, 4, 1, 0.0, smooth=False) == [1.0, 1.14, 1.14, 1.58]


def test_batch_costs_on_a_real_model(shared):
    model, _ = lf.load(shared / "models/stories260K")
    plain, chained = batch_costs(model, 3, 9, repeats=2, context=16)
    assert len(plain) == 3 and len(chained) == 9
    assert plain[0] == chained[0] == 1.0
    assert plain == sorted(plain) and chained == sorted(chained) and all(c > 0 for c in chained)
    assert batch_costs(model, 3, 9) is batch_costs(model, 3, 9)  # timed once per model and setting


def test_request_drafts_back_off_while_nothing_is_drafted(monkeypatch):
    st = RequestDrafts(4, 2, 1)
    text = [1, 2, 3, 4, 1, 2]
    looked = []
    propose = st.index.propose_longest
    monkeypatch.setattr(st.index, "propose_longest", lambda n: looked.append(1) or propose(n))
    lookups = []
    for _ in range(40):  # the policy never takes the drafts: every step is plain
        before = len(looked)
        st.offer(text, [], 4)
        st.chosen(0, [])
        lookups.append(len(looked) - before)
    assert lookups[:4] == [1, 1, 1, 1] and sum(lookups[-12:]) == 3  # then one lookup in 4 steps
    st.offer(text, [], 4)
    while not st.looked:  # up to the next real lookup: drafts taken there end the back-off
        st.chosen(0, [])
        st.offer(text, [], 4)
    assert st.found and st.chosen(2, [])[0] == st.found[:2] and st.misses == 0 and st.skip == 0
