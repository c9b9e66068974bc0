"""`torchrun ... -m leanformer serve MODEL --tp 2`: the real two-rank server answers /v1/completions with
the one-process server's greedy text (batched prompts, prefix-cache hits, then a clean SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from leanformer.cli.main import main  # noqa: E402
from leanformer.serve.app import ServeConfig, create_app, running  # noqa: E402
from leanformer.serve.loadtest import _free_port  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.distributed.test_cli_tp import _stories, _torchrun  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# a batch of three (one prompt twice: the second reads the first's cached blocks), then one alone
BODIES = [
    {"prompt": ["Once upon a time", "The little dog", "Once upon a time"], "max_tokens": 20},
    {"prompt": "Lily and Ben went to the park to play with their ball", "max_tokens": 12},
]


def _texts(url: str) -> list[list[str]]:
    out = []
    for body in BODIES:
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "temperature": 0} | body, timeout=120)
        assert r.status_code == 200, r.text
        out.append([c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])])
    return out


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("kv", ["paged", pytest.param("slots", marks=pytest.mark.slow)])
def test_serve_tp2_answers_like_one_process(shared, tmp_path, kv):
    import torch.distributed as dist

    from leanformer.loading import load

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed (torchrun)")
    model, tok = load(_stories(shared))
    with running(create_app(model, tok, ServeConfig(model_id="m", max_seq=256, kv_cache=kv))) as url:
        single = _texts(url)
    assert all(t.strip() for texts in single for t in texts)

    port = _free_port()
    cmd = [*_torchrun(2), "serve", _stories(shared), "--tp", "2", "--port", str(port), "--model-name", "m"]
    cmd += ["--max-seq", "256", "--kv-cache", kv, "--log-level", "warning"]
    err = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 (read after the process ends)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(url) or proc.poll() is not None, 180), "the server did not start"
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert _texts(url) == single
    finally:
        # SIGTERM to both ranks (rank 1 ignores it; rank 0 drains, then tells rank 1 to stop): both
        # exit 0, and so does torchrun; without /proc's child list, to torchrun, which passes it on
        ranks = _children(proc.pid)
        for pid in ranks or [proc.pid]:
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    log = (tmp_path / "stderr.txt").read_text()
    assert "tensor parallel over 2 ranks" in out
    assert "[rank1]: Traceback" not in log and "[rank0]: Traceback" not in log, log[-2000:]
    if ranks:
        assert proc.returncode == 0, log[-2000:]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_serve_tp_and_replicas_together_are_refused(shared, capsys):
    assert main(["serve", _stories(shared), "--tp", "2", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: use --tp or --replicas, not both") and "\n" not in err


def test_serve_tp_without_torchrun_is_one_line(shared, capsys):
    assert main(["serve", _stories(shared), "--tp", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tp 2 needs 2 processes") and "\n" not in err
