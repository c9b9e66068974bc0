"""Per-request speculative decoding in continuous batching (engine/spec_batch.py): greedy outputs equal
plain serving and generate() on static slots and the paged cache (with preemption too), rows of
different acceptance share verification forwards, sampled and "off" requests never draft, and the
counters add up."""

from __future__ import annotations

import pytest

import leanformer as lf
from leanformer.engine.paged import PagedScheduler
from leanformer.engine.sampling import SamplingParams
from leanformer.engine.scheduler import Scheduler
from leanformer.engine.spec_batch import SpecDecoder, check_method
from leanformer.errors import LeanformerError
from tests.engine.test_scheduler import make, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun."


@pytest.fixture(scope="module")
def stories(shared):
    return lf.load(shared / "models/stories260K")


def _prompts(tok) -> list[list[int]]:
    p = tok.encode(TEXT)
    return [p, p + p[:12], p[:20], [1, 5, 7, 9, 11], p[5:] + p[5:30]]


FLAT = ([1.0] * 16, [1.0] * 16)  # rows for free: every draft with a chance is verified (deterministic)


def _serve(sched, prompts, n, speculative="prompt-lookup", costs=FLAT, **kw):
    sched.spec = SpecDecoder()
    sched.spec.costs = costs  # None: timed on the model (spec_chain.batch_costs)
    jobs = [make(p, k, speculative=speculative, **kw) for p, k in zip(prompts, n)]
    for req, _ in jobs:
        sched.submit(req)
    run(sched, 5000)
    return [s.tokens for _, s in jobs], jobs


@pytest.mark.parametrize("kind", ["slots", "paged", "paged-preempting"])
def test_speculative_greedy_equals_plain_and_generate(stories, kind):
    model, tok = stories
    prompts, n = _prompts(tok), [40, 50, 30, 20, 45]

    def sched():
        if kind == "slots":
            return Scheduler(model, None, 4, 160)
        blocks = 26 if kind == "paged-preempting" else 200
        return PagedScheduler(model, None, 5, 160, blocks, 8)

    spec_s = sched()
    got, _ = _serve(spec_s, prompts, n)
    plain, _ = _serve(sched(), prompts, n, speculative=None)
    assert (
        got
        == plain
        == [lf.generate(model, None, p, max_new_tokens=k, ignore_eos=True) for p, k in zip(prompts, n)]
    )
    d = spec_s.spec
    assert d.drafted_total > 0 and 0 < d.accepted_total < d.drafted_total and d.rounds_total > 0
    if kind == "paged-preempting":
        assert spec_s.preemptions_total > 0
    if kind != "slots":
        bm = spec_s.blocks
        assert bm.n_free == bm.num_blocks and bm.reserved == 0


def test_rows_of_different_acceptance_share_a_verification(stories, monkeypatch):
    model, tok = stories
    sched = Scheduler(model, None, 4, 160)
    seen = []
    real = SpecDecoder._accept

    def spy(self, sched_, items, logits):
        before = [len(s.out) for s, _ in items]
        real(self, sched_, items, logits)
        seen.append({len(s.out) - b for (s, _), b in zip(items, before)})

    monkeypatch.setattr(SpecDecoder, "_accept", spy)
    prompts = _prompts(tok)
    got, _ = _serve(sched, prompts, [40] * 5)
    assert any(len(kept) > 1 for kept in seen)  # one forward, rows advanced by different amounts
    assert got == [lf.generate(model, None, p, max_new_tokens=40, ignore_eos=True) for p in prompts]


def test_sampled_and_off_requests_never_draft(stories):
    model, tok = stories
    prompts = _prompts(tok)
    sched = Scheduler(model, None, 4, 160)
    _serve(sched, prompts, [20] * 5, params=SamplingParams(temperature=0.8, seed=1))
    assert sched.spec.drafted_total == 0
    sched = Scheduler(model, None, 4, 160)
    _serve(sched, prompts, [20] * 5, speculative=None)
    assert sched.spec.drafted_total == 0


def test_logprobs_with_speculation(stories):
    model, tok = stories
    prompts = _prompts(tok)[:2]
    _, spec = _serve(Scheduler(model, None, 2, 160), prompts, [30, 30], logprobs=2)
    _, plain = _serve(Scheduler(model, None, 2, 160), prompts, [30, 30], speculative=None, logprobs=2)
    for (_, a), (_, b) in zip(spec, plain):
        la = [lp for o in a.outs for lp in (o.logprobs or [])]
        lb = [lp for o in b.outs for lp in (o.logprobs or [])]
        assert [x.token_id for x in la] == [x.token_id for x in lb] and len(la) == 30
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(la, lb))


def test_chains_on_the_module_path_equal_plain(tiny_dirs):
    """GPT-2 (no fused step): the chained rows run through the modules on the paged cache."""
    model = lf.load(tiny_dirs["gpt2"])[0]
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], [7, 8, 9, 7, 8, 9, 7, 8], [3, 3, 3, 3]]
    spec_s = PagedScheduler(model, None, 3, 96, 40, 4)
    got, _ = _serve(spec_s, prompts, [30] * 3)
    assert spec_s.spec.drafted_total > 0
    assert got == [lf.generate(model, None, p, max_new_tokens=30, ignore_eos=True) for p in prompts]


@pytest.mark.parametrize("costs", ["flat", "timed"])
@pytest.mark.parametrize("kind", ["slots", "paged"])
def test_tight_limits_and_timed_costs_keep_greedy_outputs(stories, kind, costs):
    """max_tokens of 1-3 and a cache that ends exactly where the longest request does (drafts must stop
    at both), with every draft verified (flat costs) or costs timed on the model: outputs equal plain."""
    model, tok = stories
    prompts, n = _prompts(tok), [1, 3, 2, 45, 30]
    max_seq = max(len(p) + k for p, k in zip(prompts, n))

    def sched():
        if kind == "slots":
            return Scheduler(model, None, 3, max_seq)
        return PagedScheduler(model, None, 3, max_seq, 3 * max_seq // 8 + 3, 8)

    spec_s = sched()
    got, _ = _serve(spec_s, prompts, n, costs=FLAT if costs == "flat" else None)
    assert [len(t) for t in got] == n
    assert got == [lf.generate(model, None, p, max_new_tokens=k, ignore_eos=True) for p, k in zip(prompts, n)]
    if costs == "flat":
        assert spec_s.spec.drafted_total > 0
    else:
        plain, chained = spec_s.spec.costs
        assert len(plain) == 3 and len(chained) == 16 and chained[0] == 1.0


def test_check_method():
    assert check_method("prompt-lookup") == "prompt-lookup"
    assert check_method("off") is None and check_method(None) is None
    with pytest.raises(LeanformerError, match="prompt-lookup or off"):
        check_method("draft-model")


def test_a_model_that_cannot_be_timed_never_drafts(stories, monkeypatch):
    import leanformer.engine.spec_batch as spec_batch

    def broken(*a, **k):
        raise RuntimeError("no timing here")

    monkeypatch.setattr(spec_batch, "batch_costs", broken)
    model, tok = stories
    prompts = _prompts(tok)
    sched = Scheduler(model, None, 4, 160)
    got, _ = _serve(sched, prompts, [30] * 5, costs=None)
    assert sched.spec.drafted_total == 0
    assert got == [lf.generate(model, None, p, max_new_tokens=30, ignore_eos=True) for p in prompts]
