"""The server on its paged KV cache: greedy replies equal generate() and the static-slot server (also
when a prompt's prefix comes from the prefix cache), /metrics shows blocks and prefix hits, and a
request that needs more KV than the pool holds is a 400, not a hang."""

from __future__ import annotations

import time

import httpx
import pytest

import leanformer as lf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from leanformer.serve.app import ServeConfig, create_app, running  # noqa: E402
from tests.serve.test_app import MODEL, load_stories  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

SYSTEM = "Once upon a time, there was a little girl named Lily who loved to play in the park with her dog. "


def complete(url: str, prompt: str, n: int = 12, model: str = MODEL) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    complete.prompt_tokens = r.json()["usage"]["prompt_tokens"]
    return r.json()["choices"][0]["text"]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_paged_server_equals_slots_and_generate_with_prefix_hits(shared):
    model, tok = load_stories(shared)
    prompts = [SYSTEM + "One day", SYSTEM + "She saw a", SYSTEM + "One day"]
    replies = {}
    for kind in ("paged", "slots"):
        cfg = ServeConfig(model_id=MODEL, max_batch=4, max_seq=256, kv_cache=kind, block_size=8)
        app = create_app(model, tok, cfg)
        with running(app) as url:
            replies[kind] = [complete(url, p) for p in prompts]  # one after the other: the 2nd, 3rd hit
            if kind == "paged":
                hits = metric(url, "leanformer_prefix_cache_hits_total")
                queries = metric(url, "leanformer_prefix_cache_queries_total")
                n_prompt = complete.prompt_tokens
                assert n_prompt // 8 * 8 - 8 <= hits / 2 and queries >= 3 * n_prompt - 3
                assert metric(url, "leanformer_kv_blocks_used") == 0  # all ended: nothing held
                assert metric(url, "leanformer_kv_blocks_free") == metric(url, "leanformer_kv_blocks_total")
                assert metric(url, "leanformer_kv_blocks_cached") > 0
    expected = [lf.generate(model, tok, p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    assert replies["paged"] == replies["slots"] == expected


def test_no_prefix_cache_and_request_larger_than_the_pool(shared):
    model, tok = load_stories(shared)
    cfg = ServeConfig(
        model_id=MODEL, max_batch=2, max_seq=64, kv_blocks=8, block_size=8, prefix_caching=False
    )
    app = create_app(model, tok, cfg)
    with running(app) as url:
        a, b = complete(url, SYSTEM), complete(url, SYSTEM)
        assert a == b and metric(url, "leanformer_prefix_cache_hits_total") == 0
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 200}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and "context" in r.text


@pytest.mark.slow  # ~45 s on 2 loaded cores: loading SmolLM2 and 4 generations
def test_smollm2_chat_with_a_cached_system_prompt(smollm2):
    model, tok = lf.load(smollm2)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 4}
    chats = [[system, {"role": "user", "content": q}] for q in ("Name a fruit.", "Name a colour.")]
    app = create_app(model, tok, ServeConfig(model_id="smollm2", max_batch=2, max_seq=512))
    with running(app) as url:
        for messages in chats:
            body = {"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
            assert r.json()["choices"][0]["message"]["content"] == lf.generate(
                model, tok, messages, max_new_tokens=8
            )
        assert metric(url, "leanformer_prefix_cache_hits_total") >= 32  # the system prompt's blocks


def test_load_test_reports_in_flight_and_first_ttft(shared):
    """bench-serve's load: mixed lengths and a shared prefix; in-flight requests sampled from /metrics."""
    import asyncio

    from leanformer.serve.loadtest import max_tokens_of, prompts, run_load

    texts = prompts(4, prefix_words=30, mixed=True)
    assert len({t[:100] for t in texts}) == 1 and len({len(t) for t in texts}) == 4
    assert [max_tokens_of(i, 8, True) for i in range(4)] == [2, 8, 6, 4]
    model, tok = load_stories(shared)
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=4, max_seq=256))
    # 20 ms per forward: the requests outlive the 50 ms /metrics polls (stories260K finishes them
    # between two polls on a fast machine, or a loaded one that delays the poller)
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    try:
        with running(app) as url:
            report = asyncio.run(run_load(url, MODEL, texts, 8, 4, mixed=True))
    finally:
        slow.remove()
    assert report["failed"] == 0 and report["output_tokens"] == 2 + 8 + 6 + 4
    assert 1 <= report["in_flight_max"] <= 4 and report["ttft_ms_first"] > 0
    assert report["prompt_tokens_mean"] > 30


def test_head_pruned_model_serves_like_generate(shared):
    """A decoder with per-layer head counts (PruneHeads on one layer) serves through the paged cache and
    the fused step with replies equal to generate()."""
    import torch

    from leanformer.compress.config import PruneHeads
    from leanformer.compress.recipe import prune_

    model, tok = load_stories(shared)
    calib = torch.randint(0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_(model, PruneHeads(sparsity=0.5, targets=["model.layers.1.*"]), calib, progress=False)
    assert len({layer.self_attn.n_heads for layer in model.model.layers}) == 2  # really per-layer counts
    prompts = [SYSTEM + "One day", SYSTEM + "She saw a"]
    cfg = ServeConfig(model_id=MODEL, max_batch=4, max_seq=256, kv_cache="paged", block_size=8)
    with running(create_app(model, tok, cfg)) as url:
        replies = [complete(url, p) for p in prompts]
    assert replies == [lf.generate(model, tok, p, max_new_tokens=12, ignore_eos=True) for p in prompts]
