"""Speculative decoding on the real SmolLM2-135M-Instruct, kept as int4 (the GGUF's own Q4_1 blocks) and
with the int8 KV cache: greedy output equals plain decoding token for token, for prompt lookup and for a
draft model and for self-speculation (its first 15 layers draft), on an input-grounded prompt where drafts are really accepted and rejected."""

from __future__ import annotations

import pytest

import leanformer as lf
from leanformer.engine.generate import GenerationStats
from leanformer.engine.speculative import DraftModel, PromptLookup

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


@pytest.fixture(scope="module")
def smol(smollm2):
    return lf.load(smollm2, keep_quantized=True)


def test_smollm2_int4_greedy_identical(smol):
    model, tok = smol
    model.kv_cache_dtype = "int8"  # the fp32 cache is covered on stories260K; int8 storage is the harder case
    chat = [{"role": "user", "content": f"Rewrite this passage, keeping every fact:\n\n{PASSAGE}"}]
    try:
        plain = lf.generate(model, tok, chat, max_new_tokens=32)
        stats = GenerationStats()
        looked = lf.generate(model, tok, chat, max_new_tokens=32, speculative=PromptLookup(), stats=stats)
        drafted = lf.generate(model, tok, chat, max_new_tokens=12, speculative=DraftModel(model, max_draft=3))
        skipped = lf.generate(model, tok, chat, max_new_tokens=12, speculative="layer-skip:15")
    finally:
        model.kv_cache_dtype = None
    assert looked == plain
    assert drafted == skipped == lf.generate(model, tok, chat, max_new_tokens=12)
    assert stats.drafted > 0  # the passage was really copied from: drafts were proposed and checked
