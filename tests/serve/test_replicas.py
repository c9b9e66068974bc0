"""`serve --replicas 2`: the OpenAI app on two Ray Serve replicas (local Ray cluster, 2 CPUs) answers the
real `openai` client on the unchanged routes, requests spread over both replicas, greedy text equal
to the single-process server's; bad --replicas values and a missing Ray are one-line errors."""

from __future__ import annotations

import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from leanformer.cli.main import main

PROMPT = "Once upon a time"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(shared):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from ray import serve

    from leanformer.serve.app import ServeConfig
    from leanformer.serve.replicas import deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeConfig(model_id="stories", max_batch=4, max_seq=256)
        path = str(shared / "models" / "stories260K" / "stories260K.bin")
        yield deploy(path, 2, port=_free_port(), cfg=cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_client_sees_one_model_on_two_replicas(served, shared):
    openai = pytest.importorskip("openai")
    from leanformer.loading import load
    from leanformer.serve.app import ServeConfig, create_app, running
    from leanformer.serve.replicas import REPLICA_HEADER

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["stories"]

    def ask(_):
        raw = client.completions.with_raw_response.create(
            model="stories", prompt=PROMPT, max_tokens=12, temperature=0
        )
        return raw.headers[REPLICA_HEADER], raw.parse().choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    # the same request to the single-process server (serve/app.py on a thread here)
    model, tok = load(shared / "models" / "stories260K" / "stories260K.bin")
    with running(create_app(model, tok, ServeConfig(model_id="stories", max_batch=4, max_seq=256))) as url:
        alone = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        expected = alone.completions.create(model="stories", prompt=PROMPT, max_tokens=12, temperature=0)
        expected = expected.choices[0].text
    assert {text for _, text in answers} == {expected}  # every replica runs the same engine
    assert len({replica for replica, _ in answers}) == 2  # requests spread over both

    stream = client.completions.create(
        model="stories", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected  # SSE through Ray's proxy

    with pytest.raises(openai.NotFoundError, match="not found"):  # the app's own errors, unchanged
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_replicas_are_refused_when_parsed(bad, capsys):
    assert main(["serve", "m", "--replicas", bad]) == 2
    assert capsys.readouterr().err.startswith("error: --replicas ")


def test_without_ray_replicas_is_one_line(shared, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    stories = str(shared / "models" / "stories260K" / "stories260K.bin")
    assert main(["serve", stories, "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --replicas needs Ray, which is not installed: pip install 'leanformer[ray]'"
