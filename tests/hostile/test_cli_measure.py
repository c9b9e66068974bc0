"""Hostile input for bench --peers, report and optimize: one `error:` line, exit 2, before any work."""

from __future__ import annotations

import pytest

from leanformer.cli.main import main
from tests.hostile.test_cli import no_loading, one_error_line  # noqa: F401 (fixture)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "M", "--peers", "vllm"], "unknown peer 'vllm'"),
        (["bench", "M", "--peers", "llama.cpp:int8"], "unknown peer 'llama.cpp:int8'"),
        (["bench", "M", "--peers", ","], "at least one peer"),
        (["optimize", "M", "--data", "d", "--max-ppl-increase=-1%"], "must be in (0, 1000]"),
        (["optimize", "M", "--data", "d", "--max-ppl-increase", "0"], "must be in (0, 1000]"),
        (["optimize", "M", "--data", "d", "--max-ppl-increase", "two"], "expects a number"),
        (["optimize", "M", "--data", "d", "--max-ppl-increase", "inf%"], "finite"),
        (["optimize", "M", "--max-ppl-increase", "2%"], "--data"),
        (["optimize", "M", "--data", "d", "--max-ppl-increase", "2", "--objective", "joy"], "invalid choice"),
        (["report", "M", "-o", "out", "--window", "1"], "must be at least 2"),
        (["report", "M", "-o", "out", "--peers", "nope"], "unknown peer"),
        (["report", "M"], "-o/--output"),
    ],
)
def test_parse_errors(argv, fragment, capsys):
    assert main(argv) == 2
    one_error_line(capsys, fragment)


def test_checks_before_any_model_load(tmp_path, capsys, no_loading):  # noqa: F811
    data = tmp_path / "d.txt"
    data.write_text("text")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    cases = [
        (["report", "M", "-o", str(tmp_path / "r")], "--data FILE is required"),
        (["report", "M", "-o", str(tmp_path / "r"), "--data", str(tmp_path / "no.txt")], "data file not found"),
        (["report", "M", "-o", str(foreign), "--data", str(data)], "not a leanformer report"),
        (["report", "M", "-o", str(tmp_path / "r"), "--data", str(data), "--recipes", "int9"], "no recipe file or preset"),
        (["report", "M", "-o", str(tmp_path / "r"), "--from", str(data)], "cannot read sweep results"),
        (["report", "M", "-o", str(tmp_path / "r"), "--from", str(data), "--recipes", "int8"], "drop --recipes"),
        (["optimize", "M", "--max-ppl-increase", "2", "--data", str(tmp_path / "no.txt")], "data file not found"),
        (["optimize", "M", "--max-ppl-increase", "2", "--data", str(data), "-o", str(foreign)], "not empty"),
        (["optimize", "M", "--max-ppl-increase", "2", "--data", str(data), "--json", str(foreign)], "is a folder"),
    ]  # fmt: skip
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        one_error_line(capsys, fragment)
