"""Speculative decoding on the real SmolLM2-135M-Instruct, kept as int4 (the GGUF's own Q4_1 blocks) and
with the int8 KV cache: greedy output equals plain decoding token for token, for prompt lookup and for a
draft model and for self-speculation (its first 15 layers draft), on an input-grounded prompt where drafts are really accepted and rejected."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.engine.generate import GenerationStats
from leanformer.engine.speculative import TIE_MARGIN, DraftModel, PromptLookup
from leanformer.models.fused import set_decode_activations
from leanformer.models.kv_cache import KVCache

# one intra-op thread: on the busy 2-core machine a second one made this module ~6 min instead of seconds
pytestmark = pytest.mark.usefixtures("one_thread")

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


@pytest.fixture(scope="module")
def smol(smollm2):
    return lf.load(smollm2, keep_quantized=True)


def test_smollm2_int4_greedy_identical(smol, monkeypatch):
    from leanformer.engine import speculative

    # drafts priced as free, so the draft model and layer skip really draft (the policy would find the
    # target drafting for itself hopeless); what is checked is verification and rollback
    monkeypatch.setattr(speculative, "draft_cost", lambda model, draft: 0.0)
    model, tok = smol
    model.kv_cache_dtype = "int8"  # the fp32 cache is covered on stories260K; int8 storage is the harder case
    # fp32 activations: verification rows equal one-row steps to ~1e-4 (see the test below for int8)
    set_decode_activations(model, "fp32")
    chat = [{"role": "user", "content": f"Rewrite this passage, keeping every fact:\n\n{PASSAGE}"}]
    try:
        plain = lf.generate(model, tok, chat, max_new_tokens=32)
        stats = GenerationStats()
        looked = lf.generate(model, tok, chat, max_new_tokens=32, speculative=PromptLookup(), stats=stats)
        drafted = lf.generate(model, tok, chat, max_new_tokens=12, speculative=DraftModel(model, max_draft=3))
        skipped = lf.generate(model, tok, chat, max_new_tokens=12, speculative="layer-skip:15")
    finally:
        model.kv_cache_dtype = None
        set_decode_activations(model, "auto")
    assert looked == plain
    assert drafted == skipped == lf.generate(model, tok, chat, max_new_tokens=12)
    assert stats.drafted > 0  # the passage was really copied from: drafts were proposed and checked


def _rows_vs_steps(model, prompt: list[int], toks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of toks fed as ONE verification forward (chained rows of slot 0) and as one-row steps."""
    one = torch.tensor([0])
    out = []
    for chained in (True, False):
        cache = KVCache.for_model(model, 1, len(prompt) + len(toks))
        with torch.inference_mode():
            model(torch.tensor([prompt]), cache=cache)
            cache.advance(one, len(prompt))
            if chained:
                rows = torch.tensor(toks)[:, None]
                zeros = torch.zeros(len(toks), dtype=torch.long)
                out.append(model(rows, cache=cache.chain(0), slots=zeros)[:, -1].float())
                continue
            steps = []
            for t in toks:
                steps.append(model(torch.tensor([[t]]), cache=cache, slots=one)[:, -1].float())
                cache.advance(one, 1)
            out.append(torch.cat(steps))
    return out[0], out[1]


# int8: the int8-activation GEMV sums every row with the same accumulator chains whatever the row count
# (kernels/gemv_i8_impl.h), so verification rows equal one-row steps there too
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_smollm2_verification_rows_equal_one_row_steps(smol, activations):
    """What greedy identity rests on: the k+1 rows of a verification give one-row steps' logits, to
    well inside the tie margin greedy_accept uses."""
    model, tok = smol
    ids = tok.encode(PASSAGE)
    set_decode_activations(model, activations)
    try:
        rows, steps = _rows_vs_steps(model, ids[:30], ids[30:39])  # 9 rows: last token + 8 drafts
    finally:
        set_decode_activations(model, "auto")
    assert float((rows - steps).abs().max()) < TIE_MARGIN["fp32"] / 4
