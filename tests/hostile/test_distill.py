"""`leanformer distill` against bad input: numbers refused when parsed, files / output / resume checked
before the teacher loads, and data, vocabulary and checkpoint problems refused before training starts —
each one `error:` line, exit status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from leanformer.cli.main import main
from tests.conftest import tiny_hf_model
from tests.hostile.test_cli import no_loading, one_error_line  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = [
    ("--steps", "0", "must be at least 1"),
    ("--steps", "1.5", "expects an integer"),
    ("--batch-size", "-1", "must be at least 1"),
    ("--grad-accum", "0", "must be at least 1"),
    ("--seq-len", "1", "must be at least 2"),
    ("--lr", "nan", "must be a finite number"),
    ("--lr", "0", "must be in (0, 1)"),
    ("--lr", "1.5", "must be in (0, 1)"),
    ("--warmup", "-1", "must be at least 0"),
    ("--clip", "inf", "must be a finite number"),
    ("--temperature", "0", "must be above 0"),
    ("--kl", "-1", "must be at least 0"),
    ("--contrastive", "nan", "must be a finite number"),
    ("--eval-every", "-2", "must be at least 0"),
    ("--checkpoint-every", "x", "expects an integer"),
    ("--eval-chars", "0", "must be at least 1"),
]


@pytest.fixture
def text(tmp_path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text("Once upon a time there was a little girl. " * 200)
    return p


@pytest.mark.parametrize("flag,value,fragment", BAD)
def test_bad_numbers_refused_at_parse_time(flag, value, fragment, text, tmp_path, no_loading, capsys):  # noqa: F811
    argv = [
        "distill",
        "T",
        "--student",
        "layers=0",
        "--data",
        str(text),
        "-o",
        str(tmp_path / "o"),
        flag,
        value,
    ]
    assert main(argv) == 2
    one_error_line(capsys, fragment)


def test_files_and_resume_checked_before_loading(text, tmp_path, no_loading, capsys):  # noqa: F811
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["distill", "T", "--student", "layers=0"]
    cases = [
        (["--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")], "--data file not found"),
        (["--data", str(empty), "-o", str(tmp_path / "o")], "is empty"),
        (["--data", str(text), "-o", str(tmp_path / "o"), "--resume"], "no checkpoint"),
        (["--data", str(text), "-o", str(text)], ""),  # an existing file as the output folder
    ]
    for extra, fragment in cases:
        assert main(base + extra) == 2, extra
        one_error_line(capsys, fragment)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def stories(shared, tmp_path) -> Path:
    return Path(shutil.copytree(shared / "models/stories260K", tmp_path / "stories"))


def test_too_short_data_is_one_line_before_training(stories, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    argv = [
        "distill",
        str(stories),
        "--student",
        "layers=0,2",
        "--data",
        str(short),
        "-o",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    one_error_line(capsys, "too short")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()


def test_student_with_another_vocabulary_is_refused(stories, text, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_hf_model("llama").save_pretrained(other)  # 128 tokens; stories260K has 512
    capsys.readouterr()  # transformers' "Writing model shards" bar
    argv = ["distill", str(stories), "--student", str(other), "--data", str(text), "--seq-len", "32", "-o", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    one_error_line(capsys, "vocabulary", "512")


def test_resume_from_another_runs_checkpoint_is_refused(stories, text, tmp_path, capsys):
    out = tmp_path / "o"
    common = [
        "--data",
        str(text),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "-o",
        str(out),
        "--checkpoint-every",
        "1",
    ]
    assert main(["distill", str(stories), "--student", "layers=0,2", "--steps", "2", *common]) == 0
    capsys.readouterr()
    saved = (out / "model.safetensors").read_bytes()
    argv = ["distill", str(stories), "--student", "layers=1,3", "--steps", "4", "--resume", *common]
    assert main(argv) == 2
    one_error_line(capsys, "another run")
    assert (out / "model.safetensors").read_bytes() == saved  # nothing trained, nothing saved
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    argv = [
        "distill",
        str(stories),
        "--student",
        "layers=0,2",
        "--resume",
        "--checkpoint",
        str(junk),
        *common,
    ]
    assert main(argv) == 2
    one_error_line(capsys, "not a readable")


def test_plot_without_evaluations_is_refused_before_training(stories, text, tmp_path, capsys):
    """--plot with no --eval-data: one line before any training (it trained and saved, then failed)."""
    argv = ["distill", str(stories), "--student", "layers=0,2", "--data", str(text), "--seq-len", "32",
            "--steps", "2", "-o", str(tmp_path / "o"), "--plot", str(tmp_path / "curve.png")]  # fmt: skip
    assert main(argv) == 2
    one_error_line(capsys, "--plot needs evaluations")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()
