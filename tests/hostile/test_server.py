"""Hostile and broken clients against the server (issue #10): malformed and extreme fields, a victim
stream next to requests that used to crash the batch, engine failures injected into one request,
disconnects, overload, auth, an oversized body, a dead or stuck engine. In process (uvicorn on a
loopback port, as tests/test_serve.py) on stories260K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import leanformer as lf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import leanformer.engine.scheduler as scheduler_module  # noqa: E402
from leanformer.engine.spec_chain import Chain  # noqa: E402
from leanformer.serve.app import ServeConfig, create_app, running  # noqa: E402
from tests.conftest import wait_until

MODEL = "stories"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def stories(shared):
    model, tok = lf.load(shared / "models/stories260K")
    tok.chat_template = "joined"  # llama2.c models have none: contents joined
    tok.apply_chat_template = lambda messages, **kw: " ".join(m["content"] for m in messages)
    return model, tok


@pytest.fixture(scope="module")
def server(stories):
    cfg = ServeConfig(model_id=MODEL, max_batch=8, max_seq=256, max_body_mb=1)
    app = create_app(*stories, cfg)
    with running(app) as url:
        yield url, app.state.lf.scheduler


def _post(url: str, body: dict, path: str = COMPLETIONS, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=kw.pop("timeout", 30), **kw)


def _raw(url: str, text: str, path: str = COMPLETIONS) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(url + path, content=text.encode(), headers=headers, timeout=30)


def _stream(url: str, body: dict, on_first=None) -> dict:
    """A streaming completion → its text, finish reasons, error events and whether [DONE] came."""
    got = {"text": "", "finish": [], "errors": [], "done": False}
    with httpx.stream("POST", url + COMPLETIONS, json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                got["errors"].append(event["error"])
                continue
            for c in event["choices"]:
                got["text"] += c["text"]
                if c["finish_reason"]:
                    got["finish"].append(c["finish_reason"])
            if on_first is not None:
                on_first()
    return got


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _slow(forward, delay: float):
    def slowed(*args, **kwargs):
        time.sleep(delay)
        return forward(*args, **kwargs)

    return slowed


def _fail_sampling_for_seed(monkeypatch, seed: int) -> None:
    """An engine fault inside one request's step: sampling raises for requests with this seed."""
    real = scheduler_module.sample

    def sample(logits, params, generator, seen):
        if params.seed == seed:
            raise RuntimeError("injected sampling fault")
        return real(logits, params, generator, seen)

    monkeypatch.setattr(scheduler_module, "sample", sample)


def _fail_admission_for_seed(monkeypatch, seed: int) -> None:
    """As a seed torch refuses did: admitting requests with this seed raises on the engine thread."""
    real = scheduler_module.SeqState

    def admit(req, *args):
        if req.params.seed == seed:
            raise RuntimeError("injected admission fault")
        return real(req, *args)

    monkeypatch.setattr(scheduler_module, "SeqState", admit)


BASE = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}
BAD = [  # (body, path, the field the 400 must name)
    ({"seed": 99999999999999999999999}, COMPLETIONS, "seed"),
    ({"seed": 2**63}, COMPLETIONS, "seed"),
    ({"seed": -1}, COMPLETIONS, "seed"),
    ({"seed": "7"}, COMPLETIONS, "seed"),
    ({"stream": "yes"}, COMPLETIONS, "stream"),
    ({"max_tokens": True}, COMPLETIONS, "max_tokens"),
    ({"n": "2"}, COMPLETIONS, "n"),
    ({"temperature": "0.5"}, COMPLETIONS, "temperature"),
    ({"top_k": 1.5}, COMPLETIONS, "top_k"),
    ({"prompt": [True, 1]}, COMPLETIONS, "prompt"),
    ({"prompt": []}, COMPLETIONS, "prompt"),
    ({"prompt": [[]]}, COMPLETIONS, "prompt"),
    ({"prompt": [1, 10**9]}, COMPLETIONS, "prompt"),
    ({"ignore_eos": 1}, COMPLETIONS, "ignore_eos"),
    ({"speculative": "ngram"}, COMPLETIONS, "speculative"),
    ({"speculative": True}, COMPLETIONS, "speculative"),
    ({"speculative": ["prompt-lookup"]}, CHAT, "speculative"),
    ({"messages": [{"role": "user"}]}, CHAT, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, CHAT, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, CHAT, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, CHAT, "messages.0.content"),
]


@pytest.mark.parametrize("extra, path, field", BAD, ids=[f"{f}-{json.dumps(b)[:40]}" for b, _, f in BAD])
def test_malformed_fields_are_400_naming_the_field(server, extra, path, field):
    body = BASE | extra
    if path == CHAT:
        body.pop("prompt")
    r = _post(server[0], body, path, timeout=10)  # (a huge seed used to hang: never answered)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_are_400_naming_the_field(server, field, value):
    """Python's JSON parser reads NaN / Infinity: they must not reach the sampler."""
    r = _raw(server[0], f'{{"model": "{MODEL}", "prompt": "Once", "max_tokens": 4, "{field}": {value}}}')
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_unknown_model_huge_max_tokens_and_empty_prompt(server):
    url = server[0]
    r = _post(url, BASE | {"model": "gpt-17"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = _post(url, BASE | {"max_tokens": 10**30})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(url, BASE | {"prompt": ""})  # the tokenizer's BOS alone: a valid one-token prompt
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1


def test_extreme_but_valid_sampling_values_answer(server, stories):
    """Schema-valid values that made NaN probabilities (torch.multinomial raised in the batched step)."""
    url, sched = server
    greedy = _post(url, BASE | {"temperature": 0}).json()["choices"][0]["text"]
    for extra in [{"temperature": 1e-45}, {"temperature": 1e-300, "seed": 1}, {"top_p": 1e-300}]:
        r = _post(url, BASE | extra)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extra, r.text)
    for extra in [
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 2.0, "repetition_penalty": 1e300, "top_k": 10**12},
        {"temperature": 1.0, "seed": 2**63 - 1, "n": 3},  # choice j seeds seed + j: wraps, never ≥ 2^63
    ]:
        r = _post(url, BASE | extra | {"ignore_eos": True})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["usage"]["completion_tokens"] == 8 * extra.get("n", 1)
    assert sched.errors.total() == 0
    # the Python API: the same values are safe, NaN / inf are a one-line LeanformerError
    model, tok = stories
    expected = lf.generate(model, tok, "Once upon a time", max_new_tokens=8)
    assert lf.generate(model, tok, "Once upon a time", max_new_tokens=8, temperature=1e-45) == expected
    lf.generate(
        model, tok, "Once", max_new_tokens=4, temperature=1.0, top_p=1e-300, repetition_penalty=1e-300
    )
    with pytest.raises(lf.LeanformerError, match="temperature must be a finite number"):
        lf.generate(model, tok, "Once", max_new_tokens=4, temperature=float("nan"))


def test_oversized_body_is_413(server):
    url = server[0]
    big = json.dumps(BASE | {"prompt": "a" * (2 * 2**20)})  # the fixture's limit is 1 MB
    r = _raw(url, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "1 MB" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        yield json.dumps(BASE)[:-1].encode() + b', "user": "'
        for _ in range(3):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(url + COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert _post(url, BASE).status_code == 200


def test_victim_stream_is_intact_next_to_hostile_requests(stories, monkeypatch):
    """A greedy stream runs while requests that used to crash the shared batch step run beside it, plus
    one whose sampling raises: the victim's text equals the same request served alone."""
    model, tok = stories
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=8, max_seq=256))
    sched = app.state.lf.scheduler
    victim = BASE | {"max_tokens": 150, "temperature": 0, "ignore_eos": True}
    hostile = [
        BASE | {"temperature": 1e-45},
        BASE | {"temperature": 1.0, "top_p": 1e-300},
        BASE | {"temperature": 1.0, "repetition_penalty": 1e-300},
        BASE | {"temperature": 1.5, "top_k": 10**9, "top_p": 1e-300, "repetition_penalty": 1e-300},
        BASE | {"temperature": 1.0, "seed": 4242},  # its sampling raises (injected below)
        BASE | {"seed": 99999999999999999999999},
    ]
    with running(app) as url:
        solo = _stream(url, victim)
        assert solo["finish"] == ["length"] and solo["done"]
        monkeypatch.setattr(model, "forward", _slow(model.forward, 0.01))  # the victim surely overlaps
        _fail_sampling_for_seed(monkeypatch, 4242)
        started, result = threading.Event(), {}
        reader = threading.Thread(target=lambda: result.update(_stream(url, victim, started.set)))
        reader.start()
        assert started.wait(30)
        with ThreadPoolExecutor(len(hostile)) as pool:
            answers = list(pool.map(lambda b: _post(url, b), hostile))
        victim_still_running = reader.is_alive()
        reader.join(60)
        assert result == solo  # same text, finish "length", [DONE], no error event
        assert victim_still_running and max(sched.batch_sizes) >= 3  # they really shared batches
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 500, 400]
        assert "injected sampling fault" in answers[4].json()["error"]["message"]
        assert sched.errors["sample"] == 1 and wait_until(lambda: sched.n_running == 0)


def test_injected_engine_failure_fails_only_that_request(stories, monkeypatch):
    """Faults inside one request (its admission; its sampling; a forward that raises on its prompt) end
    that request alone with an error, promptly, free its slot, count in /metrics; the server keeps
    serving. (Two requests failing admission with --max-batch 2 used to leak both slots: all 504.)"""
    model, tok = stories
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=4, max_seq=256))
    sched = app.state.lf.scheduler
    marker = 300  # a prompt token whose prefill raises (engine/prefill.py: padded or chained rows)
    forward = model.forward

    def faulty(ids, *args, **kwargs):
        prefill = ids.shape[1] > 1 or isinstance(kwargs.get("cache"), Chain)  # padded, or chained rows
        if prefill and bool((ids == marker).any()):
            raise RuntimeError("injected forward fault")
        time.sleep(0.01)
        return forward(ids, *args, **kwargs)

    victim = BASE | {"max_tokens": 150, "temperature": 0, "ignore_eos": True}
    with running(app) as url:
        solo = _stream(url, victim)
        monkeypatch.setattr(model, "forward", faulty)
        _fail_sampling_for_seed(monkeypatch, 4242)
        _fail_admission_for_seed(monkeypatch, 777)
        started, result = threading.Event(), {}
        reader = threading.Thread(target=lambda: result.update(_stream(url, victim, started.set)))
        reader.start()
        assert started.wait(30)
        t0 = time.monotonic()
        for _ in range(2):
            r = _post(url, BASE | {"seed": 777})
            assert r.status_code == 500 and "injected admission fault" in r.json()["error"]["message"]
        r = _post(url, BASE | {"temperature": 0.8, "seed": 4242})
        assert r.status_code == 500 and r.json()["error"]["code"] == "error"
        r = _post(url, BASE | {"prompt": [1, 2, marker, 4]})
        assert r.status_code == 500 and "injected forward fault" in r.json()["error"]["message"]
        failed_stream = _stream(url, BASE | {"temperature": 0.8, "seed": 4242})
        assert failed_stream["errors"][0]["code"] == "error" and failed_stream["done"]
        assert time.monotonic() - t0 < 20  # promptly, not at a timeout
        assert reader.is_alive()  # the victim ran through all of it
        reader.join(60)
        assert result == solo
        assert wait_until(lambda: sched.n_running == 0 and len(sched.free) == 4)
        assert _metric(url, 'leanformer_request_errors_total{stage="admit"}') == 2
        assert _metric(url, 'leanformer_request_errors_total{stage="sample"}') == 2
        assert _metric(url, 'leanformer_request_errors_total{stage="prefill"}') == 1
        assert _metric(url, 'leanformer_finished_total{reason="error"}') == 5
        assert _post(url, BASE).status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_client_disconnect_mid_stream_frees_the_slot(stories, monkeypatch):
    model, tok = stories
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=2, max_seq=256))
    monkeypatch.setattr(model, "forward", _slow(model.forward, 0.01))
    body = BASE | {"max_tokens": 200, "ignore_eos": True, "stream": True}
    with running(app) as url:
        with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert _metric(url, "leanformer_running_requests") == 1
        # the client went away after one event: its request is cancelled and its slot is free
        assert wait_until(lambda: _metric(url, "leanformer_running_requests") == 0)
        assert _metric(url, 'leanformer_finished_total{reason="cancelled"}') == 1
        assert _metric(url, "leanformer_generation_tokens_total") < 200
        assert len(app.state.lf.scheduler.free) == 2


def test_429_only_when_really_full(stories, monkeypatch):
    """2 slots + a queue of 2 = room for 4 requests. 4 arriving together (before the engine admits any)
    all succeed; the 5th, while they are all in flight, gets 429."""
    model, tok = stories
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=2, max_seq=128, max_queue=2))
    sched = app.state.lf.scheduler
    gate = threading.Event()  # holds the engine before admission: the 4 surely arrive together
    admit = sched._admit
    monkeypatch.setattr(sched, "_admit", lambda: (gate.wait(30), admit()))
    with running(app) as url:
        try:
            with ThreadPoolExecutor(4) as pool:
                pending = [pool.submit(_post, url, BASE) for _ in range(4)]
                assert wait_until(lambda: sched.n_waiting == 4 or any(p.done() for p in pending))
                assert sched.n_waiting == 4, [p.result().text for p in pending if p.done()]
                fifth = _post(url, BASE)
                assert fifth.status_code == 429 and fifth.headers["retry-after"] == "1"
                assert fifth.json()["error"]["type"] == "rate_limit_error"
                gate.set()
                assert [p.result().status_code for p in pending] == [200] * 4
        finally:
            gate.set()
        assert _post(url, BASE).status_code == 200  # everything ended: room again


def test_empty_api_key_is_refused(stories):
    for key in ("", "  ", " padded"):
        with pytest.raises(lf.LeanformerError, match="API key"):
            ServeConfig(model_id=MODEL, api_key=key)


def test_empty_api_key_env_stops_the_cli_before_serving(shared, tmp_path):
    env = os.environ | {"LEANFORMER_API_KEY": ""}
    cmd = [sys.executable, "-m", "leanformer.cli.main", "serve", str(shared / "models/stories260K")]
    cmd += ["--port", "0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)  # (it used to serve)
    assert p.returncode == 2 and "API key is empty" in p.stderr and "Traceback" not in p.stderr


def test_auth_wrong_missing_and_empty_bearer(stories, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    app = create_app(*stories, ServeConfig(model_id=MODEL, max_batch=2, max_seq=128, api_key="sesame"))
    with running(app) as url:
        for header in [None, "Bearer", "Bearer wrong", "Basic sesame", "sesame", "Bearer sesame2"]:
            headers = {} if header is None else {"Authorization": header}
            r = _post(url, BASE, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", header
        assert (b"wrong", b"sesame") in compared  # keys go through the constant-time comparison
        for header in ["Bearer sesame", "bearer  sesame"]:
            assert _post(url, BASE, headers={"Authorization": header}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # /health and /metrics stay open


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_fails_requests_fast_and_health_says_so(stories, monkeypatch):
    app = create_app(*stories, ServeConfig(model_id=MODEL, max_batch=2, max_seq=128))
    sched = app.state.lf.scheduler
    with running(app) as url:
        assert httpx.get(url + "/health").json()["status"] == "ok"

        def die() -> None:
            raise SystemExit  # not an Exception: gets past the engine loop's handler, the thread ends

        monkeypatch.setattr(sched, "step", die)
        t0 = time.monotonic()
        r = _post(url, BASE)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - t0 < 10  # not the request timeout (600 s)
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and "not running" in h.json()["reason"]
        assert _post(url, BASE).status_code == 503


def test_stuck_engine_step_makes_health_503(stories, monkeypatch):
    model, tok = stories
    app = create_app(model, tok, ServeConfig(model_id=MODEL, max_batch=2, max_seq=128, stall_timeout=0.3))
    release = threading.Event()
    forward = model.forward

    def stuck(*args, **kwargs):
        release.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", stuck)
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(_post, url, BASE)
            assert wait_until(lambda: httpx.get(url + "/health").status_code == 503)
            assert "engine step has been running" in httpx.get(url + "/health").json()["reason"]
        finally:
            release.set()
        assert pending.result().status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"
