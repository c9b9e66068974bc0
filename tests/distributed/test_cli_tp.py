"""`torchrun ... leanformer generate MODEL --tp 2` (or --pp 2) prints what the single-process command prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leanformer.cli.main import main
from tests.distributed.ranks import on_ranks

ARGS = ["--prompt", "Once upon a time", "--max-new-tokens", "24"]


def _torchrun(n: int) -> list[str]:
    # --standalone: a free rendezvous port, so runs in parallel (other tests, other users) never meet
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "leanformer",  # src/leanformer/__main__.py
    ]


def _stories(shared):
    return str(shared / "models" / "stories260K" / "stories260K.bin")


SAMPLED = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "3"]


@pytest.mark.parametrize(
    "flag, extra",
    [
        ("--tp", []),
        pytest.param("--pp", [], marks=pytest.mark.slow),
        pytest.param("--tp", SAMPLED, marks=pytest.mark.slow),  # every rank draws the same tokens
    ],
)
def test_torchrun_prints_the_single_process_text(shared, capsys, flag, extra):
    assert main(["generate", _stories(shared), *ARGS, *extra]) == 0
    single = capsys.readouterr().out
    assert single.startswith("Once upon a time") and len(single) > len("Once upon a time") + 20
    cmd = [*_torchrun(2), "generate", _stories(shared), *ARGS, *extra, flag, "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-8000:]  # the ranks' own tracebacks, not only torchrun's summary
    assert run.stdout == single  # one copy: only rank 0 prints


def test_tp_without_torchrun_is_one_line(shared, capsys):
    assert main(["generate", _stories(shared), "--prompt", "x", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tp 2 needs 2 processes") and "torchrun" in err and "\n" not in err


@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
@pytest.mark.parametrize("bad", ["0", "-1", "two", "1e9"])
def test_bad_tp_values_are_refused(shared, capsys, bad, command):
    assert main([command, _stories(shared), "--tp", bad]) == 2
    err = capsys.readouterr().err
    assert "--tp" in err and "Traceback" not in err


def test_tp_and_pp_together_are_refused(shared, capsys):
    assert main(["generate", _stories(shared), "--tp", "2", "--pp", "2"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: use --tp or --pp, not both (2-D parallelism is not supported)"
    )


@pytest.mark.slow
def test_smollm2_q4_tp3_prints_the_single_process_text(smollm2, capsys):
    """The real GGUF kept as int4 (Q4_1 → Int4Linear, groups of 32), 3 ranks (3 KV heads); ~30 s
    per command on the shared 2-core machine."""
    args = ["generate", str(smollm2), "--keep-quantized", "--prompt", "The capital of France is"]
    args += ["--max-new-tokens", "16"]
    assert main(args) == 0
    single = capsys.readouterr().out
    run = subprocess.run([*_torchrun(3), *args, "--tp", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single


@pytest.mark.slow
def test_torchrun_eval_tp2_prints_the_single_process_perplexity(shared, capsys):
    data = str(shared / "data" / "tinystories" / "sample.txt")
    args = ["eval", _stories(shared), "--data", data, "--max-chars", "4000", "--window", "128"]
    assert main(args) == 0
    single = capsys.readouterr().out
    assert "perplexity" in single
    run = subprocess.run([*_torchrun(2), *args, "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single


def _bench_worker(rank: int, path: str, out: str) -> None:
    import torch

    from leanformer.cli.bench_tp import measure_split
    from leanformer.distributed import parallelize_
    from leanformer.loading import load
    from leanformer.measure.bench.runner import BenchConfig

    model, _ = load(path)
    parallelize_(model)
    cfg = BenchConfig(path, prompt_tokens=8, new_tokens=3, batches=[1, 2], repeats=1)
    torch.save(measure_split(model, cfg, 0.5 + rank), f"{out}/{rank}.pt")


def test_bench_figures_are_the_slowest_ranks(shared, tmp_path):
    """measure_split on 2 forked ranks: every figure is reduced over the ranks (both report the same
    numbers; load time is the slower rank's), weights are one rank's shard, the ceiling is positive."""
    import torch

    from leanformer.loading import load

    load(_stories(shared))  # first: the forked ranks inherit what building a model imports
    on_ranks(2, tmp_path, _bench_worker, _stories(shared), str(tmp_path))
    rows = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    for key in (
        "prefill_tok_s",
        "ttft_ms",
        "decode_tok_s_b1",
        "decode_tok_s_b2",
        "ceiling_tok_s",
        "peak_rss_mb",
    ):
        assert rows[0][key] == rows[1][key] > 0, key
    assert rows[0]["load_s"] == 1.5 and rows[0]["tp"] == 2
    assert rows[0]["size_mb_all_ranks"] > rows[0]["size_mb"] > 0


@pytest.mark.slow
def test_torchrun_bench_tp2_prints_one_table(shared, tmp_path):
    """bench --tp 2: rank 0 prints the table once, every rank timed (figures > 0, JSON written by rank 0)."""
    out = tmp_path / "bench.json"
    args = ["bench", _stories(shared), "--prompt-tokens", "16", "--new-tokens", "4", "--batch", "1", "2"]
    args += ["--repeats", "1", "--json", str(out), "--tp", "2"]
    run = subprocess.run([*_torchrun(2), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("decode tokens/s, batch 2") == 1 and "leanformer tp2" in run.stdout
    assert "all 2 ranks together" in run.stdout
    import json

    row = json.loads(out.read_text())["results"][0]
    assert row["tp"] == 2 and row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0
    assert row["size_mb_all_ranks"] > row["size_mb"] > 0  # each rank holds a shard, not the model


@pytest.mark.parametrize("extra", [["--peers", "transformers"], ["--recipe", "int8"]])
def test_bench_tp_refuses_other_engines(shared, capsys, extra):
    assert main(["bench", _stories(shared), "--tp", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bench --tp measures MODEL split") and extra[0] in err and "\n" not in err
