"""Hostile input for bench --peers, report, optimize and --activations: one `error:` line, exit 2, before
any work."""

from __future__ import annotations

import re

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
        (["generate", "M", "--prompt", "x", "--activations", "int4"], "invalid choice"),
        (["eval", "M", "--data", "d", "--activations", ""], "invalid choice"),
        (["bench", "M", "--activations", "FP32"], "invalid choice"),
        (["serve", "M", "--activations", "nan"], "invalid choice"),
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


def test_peer_paired_bad_input_is_one_error_before_loading(tmp_path, monkeypatch):
    """python -m leanformer.measure.bench.peer_paired: every bad value refused before llama.cpp or our
    model loads (the loaders are replaced by ones that fail the test)."""
    from leanformer.errors import LeanformerError
    from leanformer.measure.bench import peer_paired

    def never(*a, **k):
        raise AssertionError("loaded a model before checking the input")

    monkeypatch.setattr(peer_paired, "_llama_cpp", never)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    cases = [
        ([str(tmp_path / "m.bin")], ".gguf files"),
        ([str(tmp_path / "absent.gguf")], "no such file"),
        ([str(folder)], "no such file"),
        ([str(gguf), "--rounds", "0"], "--rounds must be at least 1"),
        ([str(gguf), "--rounds", "-3"], "--rounds must be at least 1"),
        ([str(gguf), "--new-tokens", "1"], "--new-tokens must be at least 2"),
        ([str(gguf), "--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
        ([str(gguf), "--threads", "0"], "--threads must be at least 1"),
        ([str(gguf), "--batch", "1", "0"], "--batch sizes must be at least 1"),
        ([str(gguf), "--gap", "nan"], "--gap must be in"),
        ([str(gguf), "--gap", "-1"], "--gap must be in"),
        ([str(gguf), "--gap", "1e9"], "--gap must be in"),
        ([str(gguf), "--recipe", "int9"], "no recipe file or preset"),
        ([str(gguf), "--prefill", "0"], "--prefill lengths must be at least 1"),
        ([str(gguf), "--prefill", "16", "-4"], "--prefill lengths must be at least 1"),
    ]
    for argv, fragment in cases:
        with pytest.raises(LeanformerError, match=re.escape(fragment)):
            peer_paired.main(argv)
    for wrong in (["--rounds", "two"], ["--prefill", "nan"], ["--prefill", "1.5"]):  # argparse's usage line
        with pytest.raises(SystemExit):
            peer_paired.main([str(gguf), *wrong])


def test_peer_paired_file_llama_cpp_cannot_load_is_one_line(tmp_path, monkeypatch):
    from leanformer.errors import LeanformerError
    from leanformer.measure.bench import peer_paired

    def refuses(path, *a):
        raise RuntimeError(f"llama.cpp could not load {path}")

    monkeypatch.setattr(peer_paired, "_llama_cpp", refuses)
    gguf = tmp_path / "garbage.gguf"
    gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(LeanformerError, match="llama.cpp: llama.cpp could not load"):
        peer_paired.main([str(gguf)])


def test_spec_serve_ab_bad_input_is_one_error(tmp_path, monkeypatch, capsys):
    """python -m leanformer.measure.bench.spec_serve_ab: bad counts are argparse's usage line, a missing
    passages file is refused before the model loads, an over-long request is the scheduler's one line."""
    from leanformer.errors import LeanformerError
    from leanformer.measure.bench import spec_serve_ab

    def never(*a, **k):
        raise AssertionError("loaded a model before checking the input")

    monkeypatch.setattr("leanformer.loading.load", never)
    for argv in (["m", "--max-tokens", "0"], ["m", "--requests", "-1"], ["m", "--rounds", "nan"],
                 ["m", "--concurrency", "two"], ["m", "--stagger=yes"]):  # fmt: skip
        with pytest.raises(SystemExit):
            spec_serve_ab.main(argv)
    for where in (tmp_path / "absent.txt", tmp_path):
        with pytest.raises(LeanformerError, match="no such file"):
            spec_serve_ab.main(["m", "--passages", str(where)])


@pytest.mark.parametrize("command", ["bench", "report", "optimize", "compress svd-20"])
@pytest.mark.parametrize(
    "calibration, flags, fragment",
    [
        ("missing.txt", [], "--calibration file not found"),
        (".", [], "is not a file"),  # a path that exists: a folder
        ("empty.txt", [], "is empty"),
        ("text.txt", ["--calibration-samples", "0"], "--calibration-samples must be at least 1, got 0"),
        ("text.txt", ["--calibration-samples", "-3"], "--calibration-samples must be at least 1"),
        ("text.txt", ["--calibration-samples", "nan"], "--calibration-samples expects an integer"),
        ("text.txt", ["--calibration-len", "1"], "--calibration-len must be at least 2"),
    ],
)
def test_calibration_flags_refused_before_any_work(
    command,
    calibration,
    flags,
    fragment,
    tmp_path,
    capsys,
    no_loading,  # noqa: F811
):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 50)
    cal = str(tmp_path if calibration == "." else tmp_path / calibration)
    data = str(tmp_path / "text.txt")
    argv = {
        "bench": ["bench", "smollm2", "--recipe", "gptq-int4"],
        "report": ["report", "smollm2", "-o", str(tmp_path / "r"), "--data", data, "--recipes", "gptq-int4"],
        "optimize": ["optimize", "smollm2", "--data", data, "--max-ppl-increase", "2"],
        "compress svd-20": ["compress", "smollm2", "--recipe", "svd-20", "-o", str(tmp_path / "c")],
    }[command]
    assert main([*argv, "--calibration", cal, *flags]) == 2
    one_error_line(capsys, fragment)


def test_calibration_text_too_short_for_the_samples_asked(tmp_path):
    from leanformer.errors import LeanformerError
    from leanformer.measure.evaluate import calibration_ids

    class Tok:  # one id per word
        def encode(self, text, add_bos=False):
            return list(range(len(text.split())))

    text = tmp_path / "t.txt"
    text.write_text("a " * 40)
    assert calibration_ids(Tok(), text, 4, 16).shape == (4, 16)
    with pytest.raises(LeanformerError, match="at most 25 distinct samples of 16, not 99999999999"):
        calibration_ids(Tok(), text, 99999999999, 16)
    with pytest.raises(LeanformerError, match="has 40 tokens, fewer than one sample of 64"):
        calibration_ids(Tok(), text, 4, 64)
