"""`chat --tp N`: rank 0 reads stdin and every rank's `input()` returns its lines (2 forked gloo ranks),
and the torchrun chat prints the single-process conversation (SmolLM2, slow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from leanformer.cli.main import main
from leanformer.distributed.launch import SharedStdin


def _read_all(rank: int, size: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=size, timeout=timedelta(seconds=60)
    )
    try:
        real = io.StringIO("hello there\nsecond line\n" if rank == 0 else "other ranks never read this\n")
        sys.stdin = SharedStdin(real)
        lines = []
        while True:
            try:
                lines.append(input())
            except EOFError:
                break
        Path(tmp, f"{rank}.json").write_text(json.dumps(lines))
    finally:
        dist.destroy_process_group()


def test_every_rank_reads_rank_0s_lines(tmp_path):
    mp.start_processes(_read_all, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == ["hello there", "second line"]


@pytest.mark.slow
def test_smollm2_chat_tp3_prints_the_single_process_conversation(smollm2, capsys, monkeypatch):
    """~1 min per command on the shared 2-core machine."""
    said = "What is the capital of France?\nAnd of Italy?\n"
    args = ["chat", str(smollm2), "--keep-quantized", "--max-new-tokens", "12"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(said))
    assert main(args) == 0
    single = capsys.readouterr().out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    cmd += ["-m", "leanformer", *args, "--tp", "3"]
    run = subprocess.run(cmd, input=said, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single and single.count("\n") >= 2


def test_chat_tp_without_torchrun_is_one_line(shared, capsys):
    stories = str(shared / "models" / "stories260K" / "stories260K.bin")
    assert main(["chat", stories, "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tp 2 needs 2 processes") and "\n" not in err
