"""`bench --peers`: a missing, failing or crashing peer is a row with the reason, never a failed run;
real peers (ONNX Runtime, CTranslate2, llama.cpp) run when installed and are skipped when not."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys

import pytest

from leanformer.errors import LeanformerError
from leanformer.measure.bench import peers, runner
from leanformer.measure.bench.peer_worker import prompts
from leanformer.measure.bench.runner import BenchConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FIGURES = {"prefill_tok_s": 100.0, "ttft_ms": 10.0, "decode_tok_s_b1": 50.0, "peak_rss_mb": 300.0}
FIGURES |= {"size_mb": 1.0, "load_s": 0.1}


def test_parse_peers():
    assert peers.parse_peers("llama.cpp, onnxruntime:int8,llama.cpp") == ["llama.cpp", "onnxruntime:int8"]
    for bad in ("vllm", "llama.cpp:int8", "", " , "):
        with pytest.raises(LeanformerError, match="peer"):
            peers.parse_peers(bad)


def test_missing_package_is_a_row_with_the_reason(monkeypatch):
    monkeypatch.setitem(peers.PACKAGES, "onnxruntime", "no_such_package_xyz")
    row = peers.run_peer(BenchConfig("m"), "onnxruntime:int8")
    assert row["engine"] == "onnxruntime:int8" and row["dtype"] == "int8"
    assert "not installed" in row["error"] and "pip install onnxruntime" in row["error"]


@pytest.mark.parametrize(
    "body, reason",
    [
        ("import os; os.abort()", "killed by signal 6"),
        ("raise SystemExit('the engine fell over')", "the engine fell over"),
        ('print(\'{"error": "RuntimeError: llama_decode failed"}\')', "llama_decode failed"),
        ("print('not json')", "Expecting value"),
    ],
)
def test_crashing_peer_is_a_row_with_the_reason(tmp_path, monkeypatch, body, reason):
    if importlib.util.find_spec("onnxruntime") is None:
        monkeypatch.setitem(peers.PACKAGES, "onnxruntime", "json")  # any installed package
    worker = tmp_path / "worker.py"
    worker.write_text(body)
    monkeypatch.setattr(peers, "_convert_in_child", lambda peer, model, work: str(tmp_path / "model.onnx"))
    row = peers.run_peer(BenchConfig("m", repeats=1), "onnxruntime", worker=worker)
    assert reason in row["error"] and row["label"] == "onnxruntime"


def test_failed_conversion_is_a_row_with_the_reason(tiny_dirs):
    # llama.cpp needs a GGUF; an HF folder is refused by the converter, in its child process
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed (the missing-package row is tested above)")
    row = peers.run_peer(BenchConfig(str(tiny_dirs["llama"])), "llama.cpp")
    assert "GGUF" in row["error"]


def test_table_marks_failed_rows_and_ratios_against_the_first_peer_that_ran():
    from leanformer.cli.bench import bench_table

    ours = {"engine": "leanformer", "label": "leanformer", "dtype": "float32", "ceiling_tok_s": 100.0}
    ours |= {k: 2 * v for k, v in FIGURES.items()}
    failed = {"engine": "llama.cpp", "label": "llama.cpp", "dtype": "Q4_0", "error": "not installed"}
    peer = {
        "engine": "ctranslate2",
        "label": "ctranslate2",
        "dtype": "int8",
        "ceiling_tok_s": 200.0,
    } | FIGURES
    header, body = bench_table([ours, failed, peer], [1])
    assert header[-1] == "leanformer / ctranslate2"
    decode = next(r for r in body if r[0] == "decode tokens/s, batch 1")
    assert decode == ["decode tokens/s, batch 1", "100.0", "—", "50.0", "2.00×"]
    pct = next(r for r in body if r[0].startswith("decode b=1, %"))
    assert pct[1:4] == ["100.0", "—", "25.0"]  # every row that ran has its % of the ceiling


def test_cli_bench_survives_failing_peers(tiny_dirs, monkeypatch, capsys, tmp_path):
    from leanformer.cli.main import main
    from leanformer.measure.bench.turns import Contender

    # ours in-process (the rows are the point); one peer refused up front, one whose start fails
    monkeypatch.setattr(runner, "contender", functools.partial(runner.contender, in_process=True))

    def broken(cfg, peer, work):
        row = {"engine": peer, "label": peer, "dtype": "x"}
        if peer == "llama.cpp":
            return Contender(row | {"error": "boom"}, start=None)

        def start():
            raise RuntimeError("measurement failed: killed by signal 9")

        return Contender(row, start)

    monkeypatch.setattr(peers, "peer_contender", broken)
    out = tmp_path / "bench.json"
    args = ["bench", str(tiny_dirs["llama"]), "--peers", "llama.cpp,ctranslate2", "--prompt-tokens", "8"]
    args += ["--new-tokens", "3", "--batch", "1", "--repeats", "1", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("CPU: ") and "llama.cpp: not measured: boom" in text
    assert "ctranslate2: not measured: measurement failed: killed by signal 9" in text
    doc = json.loads(out.read_text())
    assert [r["engine"] for r in doc["results"]] == ["leanformer", "llama.cpp", "ctranslate2"]
    assert doc["results"][0]["peak_rss_mb"] > 0 and doc["machine"]["cpu"]["model"]


def test_same_prompts_for_every_engine():
    assert prompts(1000, 2, 5) == prompts(1000, 2, 5) and len(prompts(1000, 2, 5)[1]) == 5
    assert runner._prompts(1000, 2, 5).tolist() == prompts(1000, 2, 5)


def test_machine_is_the_kernels_description():
    where = peers.machine()
    assert where["summary"].startswith(where["cpu"]["model"]) and "paths" in where


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["onnxruntime", "onnxruntime:int8", "ctranslate2"])
def test_real_peer_on_smollm2(smollm2, peer):
    """Each real peer converts and runs the SmolLM2 weights in its own process (skipped when absent)."""
    if peers.missing(peer):
        pytest.skip(peers.missing(peer))
    cfg = BenchConfig(str(smollm2), prompt_tokens=16, new_tokens=4, batches=[1, 2], repeats=1)
    row = peers.run_peer(cfg, peer)
    assert "error" not in row, row["error"]
    assert row["decode_tok_s_b2"] > 0 and 0 < row["peak_rss_mb"] < 4096 and row["ceiling_tok_s"] > 0


@pytest.mark.slow
def test_llama_cpp_on_the_smollm2_gguf(smollm2):
    if peers.missing("llama.cpp"):
        pytest.skip(peers.missing("llama.cpp"))
    cfg = BenchConfig(str(smollm2), prompt_tokens=16, new_tokens=4, batches=[1, 2], repeats=1)
    row = peers.run_peer(cfg, "llama.cpp")
    assert "error" not in row, row["error"]
    assert row["dtype"] == "Q4_1" and row["decode_tok_s_b1"] > 0 and row["peak_rss_mb"] < sys.maxsize
