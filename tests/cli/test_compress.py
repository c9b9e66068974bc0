"""`leanformer compress` streams layer by layer where it can: peak RSS in the table, the same saved
weights as --in-memory, one-line refusals (disk space, --stream on a model it cannot serve)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from leanformer.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_streamed_and_in_memory_saves_are_identical(shared, tmp_path, capsys):
    model = str(shared / "models/stories260K")
    base = ["compress", model, "--recipe", "int8", "--no-speed"]
    assert main([*base, "-o", str(tmp_path / "s")]) == 0
    streamed = capsys.readouterr().out
    assert "peak RSS layer by layer (MB)" in streamed and "weights before → after (MB)" in streamed
    assert main([*base, "-o", str(tmp_path / "m"), "--in-memory"]) == 0
    assert "peak RSS in memory (MB)" in capsys.readouterr().out
    a, b = load_file(tmp_path / "s/model.safetensors"), load_file(tmp_path / "m/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_disk_space_is_checked_before_work(shared, tmp_path, capsys, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 30, 1 << 30, 1024))
    out = tmp_path / "out"
    args = ["compress", str(shared / "models/stories260K"), "--recipe", "int8", "-o", str(out), "--no-speed"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "MB free" in err and "--output" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_stream_refuses_what_it_cannot_serve(tiny_dirs, tmp_path, capsys):
    # streaming packs SparseStorage once every layer is pruned, so it must be the last stage
    recipe = tmp_path / "sparse-then-int8.json"
    recipe.write_text(
        '[{"type": "Magnitude", "sparsity": 0.5}, {"type": "SparseStorage"}, {"type": "Int8WeightOnly"}]'
    )
    args = [
        "compress",
        str(tiny_dirs["gpt2"]),
        "--recipe",
        str(recipe),
        "-o",
        str(tmp_path / "o"),
        "--no-speed",
    ]
    assert main([*args, "--stream"]) == 2
    assert "--in-memory" in capsys.readouterr().err
    assert main(args) == 0  # without --stream: falls back to memory, saying why
    assert "compressing in memory: " in capsys.readouterr().err
