"""KV-cached decoding vs full recompute, batching vs alone, sampling reproducibility, stops."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.models.kv_cache import KVCache


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_dirs):
    return lf.load(tiny_dirs[request.param])[0]


def test_cached_decode_equals_recompute_logits(model):
    prompt = [3, 17, 42, 5, 99, 8]
    cache = KVCache.for_model(model, 1, 64)
    ids = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache)[:, -1]
        cache.advance(torch.tensor([0]), len(ids))
        for _ in range(20):
            full = model(torch.tensor([ids]))[:, -1]  # no cache: recompute everything
            assert (full - logits).abs().max().item() <= 1e-4
            nxt = int(full.argmax())
            ids.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache, slots=torch.tensor([0]))[:, -1]
            cache.advance(torch.tensor([0]), 1)


def test_generate_equals_greedy_recompute(model):
    prompt = [1, 5, 7, 9, 11]
    out = lf.generate(model, None, prompt, max_new_tokens=16, ignore_eos=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_batched_unequal_prompts_equal_alone(model):
    prompts = [[1, 5, 7, 9, 11], [2, 3], [4] * 9, [8, 6, 4, 2]]
    batch = lf.generate(model, None, prompts, max_new_tokens=12, ignore_eos=True)
    alone = [lf.generate(model, None, p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    assert batch == alone


def test_seeded_sampling_is_reproducible(model):
    kw = dict(
        max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, ignore_eos=True
    )
    a = lf.generate(model, None, [1, 2, 3], seed=7, **kw)
    b = lf.generate(model, None, [1, 2, 3], seed=7, **kw)
    c = lf.generate(model, None, [1, 2, 3], seed=8, **kw)
    assert a == b and len(a) == 16
    assert a != c  # different seed, different sample (overwhelmingly likely with 16 tokens)


def test_stream_yields_same_tokens_as_generate(model):
    streamed = list(lf.stream_generate(model, None, [1, 2, 3], max_new_tokens=10, ignore_eos=True))
    assert streamed == lf.generate(model, None, [1, 2, 3], max_new_tokens=10, ignore_eos=True)


def test_stops_at_eos(model):
    first = lf.generate(model, None, [1, 2, 3], max_new_tokens=5, ignore_eos=True)
    model.config["eos_token_id"] = first[2]
    try:
        assert lf.generate(model, None, [1, 2, 3], max_new_tokens=5) == first[: first.index(first[2])]
    finally:
        model.config.pop("eos_token_id")


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(lf.LeanformerError, match="exceeds the model's context"):
        lf.generate(model, None, [1] * 200, max_new_tokens=100)


def test_bad_sampling_params():
    with pytest.raises(lf.LeanformerError, match="top_p"):
        lf.SamplingParams(top_p=0)
    with pytest.raises(lf.LeanformerError, match="temperature"):
        lf.SamplingParams(temperature=-1)


def test_text_prompt_without_tokenizer_is_a_clear_error(model):
    with pytest.raises(lf.LeanformerError, match="no tokenizer"):
        lf.generate(model, None, "hello")


class _NoBosTokenizer:
    """Encodes text as one id per character and "" as no ids at all, like tokenizers without a BOS."""

    eos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 100 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([], "empty prompt"),
        ([1, 2, 128], "token id 128, outside this model's vocabulary 0..127"),
        ([5, -1], "token id -1"),
        ([[1, 2], [7, 10_000]], "prompt 1 holds token id 10000"),
        ([[1, 2], []], "empty prompt"),
        (torch.tensor([3, 999]), "token id 999"),
    ],
)
def test_bad_prompts_are_one_clear_error(model, prompt, match):
    """issue #10: these raised a raw IndexError from the embedding lookup (or deep in the batching)."""
    with pytest.raises(lf.LeanformerError, match=match) as e:
        lf.generate(model, None, prompt, max_new_tokens=2)
    assert "\n" not in str(e.value)
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], list)):
        with pytest.raises(lf.LeanformerError, match=match):
            list(lf.stream_generate(model, None, prompt, max_new_tokens=2))


def test_empty_text_that_encodes_to_nothing(model):
    tok = _NoBosTokenizer()
    with pytest.raises(lf.LeanformerError, match="no tokens"):
        lf.generate(model, tok, "", max_new_tokens=2)
    with pytest.raises(lf.LeanformerError, match="no tokens"):
        list(lf.stream_generate(model, tok, "", max_new_tokens=2))
    assert len(lf.generate(model, tok, "ab", max_new_tokens=2, ignore_eos=True)) == 2


def test_non_finite_logits_warn(model):
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in broken.named_parameters():  # every norm: a NaN anywhere would reach the logits
            if "norm" in name or ".ln" in name:
                p.fill_(float("nan"))
    with pytest.warns(UserWarning, match="logits hold NaN or inf"):
        lf.generate(broken, None, [1, 2, 3], max_new_tokens=3, ignore_eos=True)
    with pytest.warns(UserWarning, match="logits hold NaN or inf"):
        list(lf.stream_generate(broken, None, [1, 2, 3], max_new_tokens=3, ignore_eos=True))


def test_decode_seconds_counted_when_generation_stops_at_eos(model):
    """generate() stops iterating the decode loop at EOS; the decode time must already be counted."""
    from leanformer.engine.generate import GenerationStats

    first = lf.generate(model, None, [1, 2, 3], max_new_tokens=6, ignore_eos=True)
    eos = next(t for t in first if first.index(t) > 0)  # a token that is not the first one: decode ran
    model.config["eos_token_id"] = eos
    try:
        for spec in (None, "prompt-lookup"):
            stats = GenerationStats()
            lf.generate(model, None, [1, 2, 3], max_new_tokens=6, stats=stats, speculative=spec)
            assert stats.new_tokens == first.index(eos) + 1 < 6  # stopped at EOS (counted)
            assert stats.decode_s > 0 and stats.prefill_s > 0, spec
    finally:
        model.config.pop("eos_token_id")
