"""Speculative decoding: greedy output equals plain decoding on real weights (stories260K, SmolLM2 fp32 /
int4, int8 KV cache); sampling keeps the target's distribution; rollback and chained verification rows
read nothing past a slot's length; bad arguments are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import leanformer as lf
from leanformer.engine.generate import GenerationStats
from leanformer.engine.sampling import SamplingParams, probabilities
from leanformer.engine.speculative import (
    Controller,
    DraftModel,
    LayerSkip,
    NgramIndex,
    PromptLookup,
    early_exit,
    greedy_accept,
    lookup,
    verify,
)
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread", "free_draft")


@pytest.fixture
def free_draft(monkeypatch):
    """Draft models priced as free: on a 260K-parameter model a draft costs about a target step (Python
    overhead), so the cost policy would rarely run it; these tests check verification, rollback and
    the output distribution, which need drafts to run (spec_policy's tests check the policy)."""
    from leanformer.engine import speculative

    monkeypatch.setattr(speculative, "draft_cost", lambda model, draft: 0.0)


STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her ball. "
    "One day, Lily saw a big red ball in the park. Lily said: Once upon a time, there was a little"
)


@pytest.fixture(scope="module")
def stories(shared):
    return lf.load(shared / "models" / "stories260K")


@pytest.mark.parametrize("kv", [None, "int8"])
@pytest.mark.parametrize("which", ["lookup", "draft-self", "draft-small", "layer-skip"])
def test_greedy_identical_to_plain_stories260k(stories, kv, which):
    model, tok = stories
    model.kv_cache_dtype = kv  # what quantize_(model, KVCache(dtype="int8")) sets: KVCache.for_model reads it
    try:
        spec = {
            "lookup": PromptLookup(max_draft=8, ngram=2),
            "draft-self": DraftModel(model, max_draft=5),  # always right: exercises long accepted runs
            "draft-small": DraftModel(_truncated(model, 2), max_draft=4),  # often wrong: rollbacks
            "layer-skip": LayerSkip(layers=3, max_draft=4),  # the target's own first 3 of 5 layers
        }[which]
        plain = lf.generate(model, tok, STORY, max_new_tokens=120, ignore_eos=True)
        stats = GenerationStats()
        out = lf.generate(
            model, tok, STORY, max_new_tokens=120, ignore_eos=True, speculative=spec, stats=stats
        )
        assert out == plain
        assert stats.new_tokens == 120 and stats.drafted > 0
        if which == "draft-self":
            assert stats.accepted == stats.drafted  # the target drafting for itself is never rejected
        if which in ("draft-small", "layer-skip"):
            assert stats.accepted < stats.drafted  # rejections happened, so rollback was exercised
    finally:
        model.kv_cache_dtype = None


def _truncated(model, n_layers: int, **changes):
    """A draft made of the model's first n layers (+ final norm + head): cheap and often wrong."""
    draft = type(model)(dataclasses.replace(model.args, num_hidden_layers=n_layers, **changes))
    if not changes:
        draft.load_state_dict(model.state_dict(), strict=False)  # layers >= n are left out
    return draft


def test_early_exit_view_shares_every_weight_and_leaves_the_model_whole(stories):
    model, _ = stories
    draft = early_exit(model, 2)
    ids = torch.tensor([[1, 50, 60, 70]])
    assert len(draft.model.layers) == 2 and len(model.model.layers) == 5 and model.args.num_hidden_layers == 5
    assert {p.data_ptr() for p in draft.parameters()} <= {p.data_ptr() for p in model.parameters()}
    assert torch.allclose(draft(ids), _truncated(model, 2)(ids), atol=1e-6)
    for bad in (LayerSkip(5), "layer-skip:5"):
        with pytest.raises(LeanformerError, match=r"layers must be in 1\.\.4"):
            lf.generate(model, None, [1, 2], max_new_tokens=2, speculative=bad)
    with pytest.raises(LeanformerError, match="positive integer"):
        LayerSkip(layers=-1)


def test_stream_generate_speculative_equals_plain(stories):
    model, tok = stories
    plain = "".join(lf.stream_generate(model, tok, STORY, 60, ignore_eos=True))
    spec = "".join(lf.stream_generate(model, tok, STORY, 60, ignore_eos=True, speculative="prompt-lookup"))
    assert spec == plain and len(plain) > 20


def test_stops_at_eos_and_max_new_tokens(stories):
    model, tok = stories
    for n in (1, 2, 7):
        assert len(lf.generate(model, None, [1, 5, 7, 5, 7, 5], max_new_tokens=n, ignore_eos=True,
                               speculative="prompt-lookup")) == n  # fmt: skip
    plain = lf.generate(model, tok, "Lily", max_new_tokens=400)  # stops at EOS before 400
    assert lf.generate(model, tok, "Lily", max_new_tokens=400, speculative=DraftModel(model)) == plain


def test_batch_falls_back_to_plain(stories):
    model, _ = stories
    prompts = [[1, 5, 7, 9, 5, 7], [1, 2, 3]]
    plain = lf.generate(model, None, prompts, max_new_tokens=10, ignore_eos=True)
    assert (
        lf.generate(model, None, prompts, max_new_tokens=10, ignore_eos=True, speculative="prompt-lookup")
        == plain
    )


def test_chain_rows_match_sequential_steps_and_rollback(stories):
    """Verification rows [B, 1] in one slot == B one-token steps; after truncate, stale entries are unread."""
    model, _ = stories
    prompt, toks = [1, 5, 7, 9, 11, 30], [3, 8, 20, 50]
    with torch.inference_mode():
        seq_cache = KVCache.for_model(model, 1, 32)
        model(torch.tensor([prompt]), cache=seq_cache)
        seq_cache.advance(torch.tensor([0]), len(prompt))
        steps = []
        for t in toks:
            steps.append(model(torch.tensor([[t]]), cache=seq_cache, slots=torch.tensor([0]))[:, -1])
            seq_cache.advance(torch.tensor([0]), 1)
        cache = KVCache.for_model(model, 1, 32)
        model(torch.tensor([prompt]), cache=cache)
        cache.advance(torch.tensor([0]), len(prompt))
        rows = model(
            torch.tensor(toks)[:, None], cache=cache.chain(0), slots=torch.zeros(4, dtype=torch.long)
        )
        torch.testing.assert_close(rows[:, -1], torch.cat(steps), atol=1e-4, rtol=0)
        # roll back the last 3 (as if rejected), then continue with other tokens: must equal a fresh run
        cache.advance(torch.tensor([0]), 1)
        cache.truncate(0, len(prompt) + 1)
        after = model(torch.tensor([[99]]), cache=cache, slots=torch.tensor([0]))[:, -1]
        ref = model(torch.tensor([prompt + toks[:1] + [99]]))[:, -1]
        torch.testing.assert_close(after, ref, atol=1e-4, rtol=0)
        with pytest.raises(LeanformerError):
            cache.truncate(0, 999)


def test_lookup_proposes_latest_continuation():
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert lookup(seq, 2, 3, 1) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert lookup([5, 6, 7], 4, 3, 1) == []
    assert lookup([4, 5, 4], 3, 2, 2) == []  # "5 4" never occurred before; 1-grams not allowed


def test_layer_skip_draft_shares_the_target_cache(stories):
    """A LayerSkip draft reads and writes the target's cache tensors of its layers (no prefill, no
    catch-up); a draft model of its own keeps its own cache."""
    from leanformer.engine.speculative import _DraftRunner

    model, _ = stories
    cache = KVCache.for_model(model, 1, 32)
    shared = _DraftRunner(early_exit(model, 3), 32, model, cache)
    assert shared.shared and len(shared.cache.k) == 3
    assert all(a is b for a, b in zip(shared.cache.k + shared.cache.v, cache.k[:3] + cache.v[:3]))
    own = _DraftRunner(_truncated(model, 3), 32, model, cache)
    assert not own.shared and own.cache.k[0] is not cache.k[0]


def test_layer_skip_view_is_kept_per_model_until_a_module_changes(stories):
    """resolve_speculative keeps one early_exit view per model and depth (its fused stack and draft cost
    are built once), and builds a new one once the model's modules are not the view's any more."""
    from leanformer.engine.speculative import resolve_speculative

    model, _ = stories
    a = resolve_speculative(LayerSkip(3), model).model
    assert resolve_speculative("layer-skip:3", model).model is a
    assert resolve_speculative(LayerSkip(2), model).model is not a
    old_head = model.lm_head
    try:
        model.lm_head = torch.nn.Linear(old_head.in_features, old_head.out_features, bias=False)
        b = resolve_speculative(LayerSkip(3), model).model
        assert b is not a and b.lm_head is model.lm_head
    finally:
        model.lm_head = old_head


def test_draft_catches_up_in_chained_rows_as_a_prefill_would(stories):
    """A draft with its own cache, a few tokens behind, feeds them as chained decode rows: the same next-
    token logits as feeding them as one prompt."""
    from leanformer.engine.speculative import _DraftRunner

    model, _ = stories
    draft = _truncated(model, 3)
    cache = KVCache.for_model(model, 1, 64)
    seq = list(range(10, 30))
    runs = []
    for behind in (5, 12):  # chained rows (<= CATCH_UP_ROWS), then a [1, n] forward
        runner = _DraftRunner(draft, 64, model, cache)
        runner.prefill(seq[: len(seq) - behind])
        runs.append(runner.propose(seq, 3, SamplingParams(), None)[0])
        assert runner.length == len(seq) and int(runner.cache.lengths[0]) == len(seq) + 2
    fresh = _DraftRunner(draft, 64, model, cache)
    fresh.prefill(seq[:-1])
    assert runs[0] == runs[1] == fresh.propose(seq, 3, SamplingParams(), None)[0]


def test_lookup_drafts_from_the_prompt(stories):
    """16 tokens into the story's repeated opening, drafts come from the prompt (not only from the few
    tokens generated so far) and are kept."""
    model, tok = stories
    stats = GenerationStats()
    spec = PromptLookup(max_draft=8, ngram=2)
    lf.generate(model, tok, STORY, max_new_tokens=16, ignore_eos=True, speculative=spec, stats=stats)
    assert stats.accepted > 0


def test_ngram_index_proposes_what_lookup_does():
    """The incremental index gives lookup()'s drafts (and the n that matched) at every length."""
    gen = torch.Generator().manual_seed(0)
    for ngram, min_ngram in ((3, 1), (2, 2), (4, 2)):
        seq = torch.randint(0, 5, (300,), generator=gen).tolist()  # small alphabet: many repeats
        index = NgramIndex(ngram, min_ngram)
        for i, t in enumerate(seq):
            index.extend([t])
            drafts, n = index.propose(4)
            assert drafts == lookup(seq[: i + 1], 4, ngram, min_ngram)
            assert (n > 0) == bool(drafts) and (not n or seq[i + 1 - n : i + 1] == seq[: i + 1][-n:])


def test_greedy_accept_stops_at_a_near_tie():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 4.0], [2.0, 2.0005, 0.0], [9.0, 0.0, 0.0]])
    assert greedy_accept(logits, [1, 2, 0], margin=0.0) == (2, 1)  # plain argmax rule: 2 kept, then 1
    assert greedy_accept(logits, [1, 2, 0], margin=1e-3) == (2, None)  # row 2 is a tie: recomputed
    assert greedy_accept(logits, [1, 0, 0], margin=1e-3) == (1, 2)  # a clear rejection
    assert greedy_accept(logits[:1], [], margin=1e-3) == (0, 1)


def test_sampling_keeps_target_distribution():
    """Rejection sampling with a point-mass draft (prompt lookup) and a real draft q: the accepted-or-
    resampled first token follows p. Total variation over 4000 draws stays under 0.04 (expected ~0.015)."""
    torch.manual_seed(0)
    v = 6
    logits = torch.randn(2, v) * 1.5
    params = SamplingParams(temperature=1.0, seed=0)
    p = logits[0].softmax(-1)
    q = torch.randn(v).softmax(-1)
    n = 4000
    gen = torch.Generator().manual_seed(1)
    for draft_q in (None, q):
        counts = torch.zeros(v)
        for _ in range(n):
            d = 2 if draft_q is None else int(torch.multinomial(draft_q, 1, generator=gen))
            accepted, nxt = verify(logits, [d], None if draft_q is None else draft_q[None], params, gen)
            counts[d if accepted else nxt] += 1
        tv = 0.5 * (counts / n - p).abs().sum().item()
        assert tv < 0.04, (draft_q, tv)


def test_sampled_generation_distribution_matches_target(stories):
    """Second generated token over many seeds vs its exact distribution under the target,
    sum over t1 of p(t1) p(t2 | t1) (top-k 4 keeps the support small enough to estimate)."""
    model, _ = stories
    prompt = [1, 5, 7, 5, 7, 5, 7, 5]
    params = SamplingParams(temperature=1.0, top_k=4)
    with torch.inference_mode():
        first = probabilities(model(torch.tensor([prompt]))[:, -1], params)[0]
        exact = torch.zeros(model.args.vocab_size)
        for t1 in first.nonzero().flatten().tolist():
            exact += first[t1] * probabilities(model(torch.tensor([prompt + [t1]]))[:, -1], params)[0]
    kw = dict(max_new_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
    for spec in (PromptLookup(max_draft=2, ngram=2), DraftModel(_truncated(model, 2), max_draft=2)):
        h = torch.zeros(model.args.vocab_size)
        for seed in range(200):
            h[lf.generate(model, None, prompt, seed=seed, speculative=spec, **kw)[1]] += 1
        assert 0.5 * (h / h.sum() - exact).abs().sum().item() < 0.15


def test_controller_drafts_only_when_it_pays():
    c = Controller(8)
    for _ in range(Controller.PROBE):
        assert c.draft_len() == 0  # first: measure plain steps
        c.plain(0.010)
    k = c.draft_len()
    assert k == 2
    c.round(k, 2, 0.016)  # both kept; a verified row costs 3 ms
    assert c.draft_len() > 2  # drafts survive and are cheap: draft more
    for _ in range(10):
        k = c.draft_len()
        c.round(k, 0, 0.010 + 0.003 * k) if k else c.plain(0.010)  # every draft rejected
    assert c.draft_len() == 0 and c.fallbacks == 1  # nothing pays any more: plain steps
    for _ in range(40):
        c.observe(1, 1)  # prompt lookup would have guessed right again
    assert c.draft_len() > 0


def test_controller_spaces_reprobes_of_an_expensive_draft():
    """A draft costing 0.8 of a plain step per token re-probes no sooner than 0.8 / 2% = 40 plain steps
    after falling back (a cheap one after 16), so probes cost at most ~2% of the time."""
    for row_cost, first_probe in ((0.008, 40), (0.001, 16)):
        c = Controller(8)
        for _ in range(Controller.PROBE):
            c.draft_len()
            c.plain(0.010)
        for _ in range(12):
            k = c.draft_len()
            c.round(k, 0, 0.010 + row_cost * k) if k else c.plain(0.010)
            if c.fallbacks:
                break
        assert c.fallbacks == 1
        steps = 1 + next(i for i in range(1, 300) if c.draft_len() > 0)
        assert steps == first_probe, (row_cost, steps)


def test_bad_arguments_are_one_line_errors(stories):
    model, tok = stories
    for bad in ("lookup", 3):
        with pytest.raises(LeanformerError):
            lf.generate(model, tok, "x", max_new_tokens=2, speculative=bad)
    with pytest.raises(LeanformerError):
        PromptLookup(max_draft=0)
    with pytest.raises(LeanformerError):
        PromptLookup(max_draft=99)
    with pytest.raises(LeanformerError):
        PromptLookup(ngram=1, min_ngram=2)
    with pytest.raises(LeanformerError):
        DraftModel(torch.nn.Linear(2, 2))
    other = _truncated(model, 1, vocab_size=999)
    with pytest.raises(LeanformerError, match="vocabulary"):
        lf.generate(model, tok, "x", max_new_tokens=2, speculative=DraftModel(other))
