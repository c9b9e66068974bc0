"""Prompt lookup over a batch of prompts (engine/spec_rows.py): rows draft and accept different
counts in one verification forward, and every row's greedy output equals plain batched decoding's."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.engine import spec_rows
from leanformer.engine.generate import GenerationStats
from leanformer.engine.speculative import PromptLookup
from leanformer.models.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her ball. "
    "One day, Lily saw a big red ball in the park. Lily said: Once upon a time, there was a little"
)
PROMPTS = [STORY, "Lily and Tom went to the park. Lily and Tom", STORY[:80], "Once upon a time"]


@pytest.fixture(scope="module")
def stories(shared):
    return lf.load(shared / "models" / "stories260K")


@pytest.mark.parametrize("kv", [None, "int8"])
def test_batch_rows_of_different_acceptance_equal_plain_batched_greedy(stories, kv, monkeypatch):
    model, tok = stories
    # every row with a match drafts up to 4 tokens each round (no cost model: deterministic), and the
    # accepted counts of each verification forward are recorded per row
    monkeypatch.setattr(
        spec_rows, "_allocate", lambda control, found, n: {r: min(4, len(d)) for r, (d, _) in found.items()}
    )
    rounds: list[list[int]] = []
    accept = spec_rows.greedy_accept

    def recording(logits, drafts, margin):
        out = accept(logits, drafts, margin)
        if drafts:
            rounds[-1].append(out[0])
        return out

    def forward_hook(*_):
        rounds.append([])

    monkeypatch.setattr(spec_rows, "greedy_accept", recording)
    handle = model.register_forward_pre_hook(forward_hook)
    model.kv_cache_dtype = kv
    try:
        plain = lf.generate(model, tok, PROMPTS, max_new_tokens=60, ignore_eos=True)
        rounds.clear()
        stats = GenerationStats()
        spec = lf.generate(
            model, tok, PROMPTS, max_new_tokens=60, ignore_eos=True, stats=stats,
            speculative=PromptLookup(max_draft=4, ngram=2),
        )  # fmt: skip
    finally:
        handle.remove()
        model.kv_cache_dtype = None
    assert spec == plain
    assert stats.per_row == [60] * 4 and stats.steps < 59  # fewer target forwards than plain decoding
    assert 0 < stats.accepted < stats.drafted
    # some verification forward held rows that kept different numbers of drafts
    assert any(len(set(r)) > 1 for r in rounds if len(r) > 1)


def test_batch_stops_each_row_at_eos_and_budget(stories):
    model, tok = stories
    ids = [tok.encode(p) for p in PROMPTS]
    free = lf.generate(model, None, ids, max_new_tokens=40, ignore_eos=True)
    model.config["eos_token_id"] = free[1][20]  # row 1 stops by its 21st token, others maybe elsewhere
    try:
        plain = lf.generate(model, None, ids, max_new_tokens=40)
        assert lf.generate(model, None, ids, max_new_tokens=40, speculative="prompt-lookup") == plain
    finally:
        model.config.pop("eos_token_id")
    assert len(plain[1]) <= 20 and max(len(p) for p in plain) == 40
    short = lf.generate(model, None, [[1, 5, 7, 5, 7, 5], [1, 2]], max_new_tokens=3, ignore_eos=True,
                        speculative="prompt-lookup")  # fmt: skip
    assert [len(s) for s in short] == [3, 3]


def test_chain_rows_of_two_slots_match_sequential_steps(stories):
    """Rows [a1 a2 a3 | b1] of slots 0 and 1 in one forward == one-token steps of each slot."""
    model, _ = stories
    prompts, toks = ([1, 5, 7, 9], [1, 30, 31, 32, 33, 34]), ([3, 8, 20], [50])
    one = torch.tensor([0])
    with torch.inference_mode():
        ref = []
        for p, ts in zip(prompts, toks):
            c = KVCache.for_model(model, 1, 16)
            model(torch.tensor([p]), cache=c)
            c.advance(one, len(p))
            for t in ts:
                ref.append(model(torch.tensor([[t]]), cache=c, slots=one)[:, -1])
                c.advance(one, 1)
        cache = KVCache.for_model(model, 2, 16)
        for slot, p in enumerate(prompts):
            model(torch.tensor([p]), cache=cache, slots=torch.tensor([slot]))
            cache.advance(torch.tensor([slot]), len(p))
        slots = [0, 0, 0, 1]
        view = spec_rows.ChainRows(cache, slots)
        rows = model(torch.tensor(toks[0] + toks[1])[:, None], cache=view, slots=torch.tensor(slots))
    torch.testing.assert_close(rows[:, -1], torch.cat(ref), atol=1e-4, rtol=0)
