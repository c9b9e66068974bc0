"""The CLI against bad input (issue #10): every numeric flag of every command is checked when parsed,
output paths are checked before any model is loaded, and every failure is one `error:` line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanformer.cli.main import build_parser, main
from tests.conftest import tiny_hf_model

M = "MODEL"  # replaced by an existing folder: loading is stubbed out where these run


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: argument and output-path checks must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was reported")

    for target in (
        "leanformer.load",
        "leanformer.loading.load",
        "leanformer.encoders.load_encoder",
        "leanformer.measure.bench.runner.run_engine",
    ):
        monkeypatch.setattr(target, loaded)


@pytest.fixture
def fake_model(tmp_path) -> Path:
    d = tmp_path / "models" / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


SAMPLING = [
    ("--max-new-tokens", "-1", "must be at least 1"),
    ("--max-new-tokens", "0", "must be at least 1"),
    ("--max-new-tokens", "ten", "expects an integer"),
    ("--temperature", "nan", "must be a finite number"),
    ("--temperature", "inf", "must be a finite number"),
    ("--temperature", "-0.5", "must be at least 0"),
    ("--top-k", "-1", "must be at least 0"),
    ("--top-k", "1.5", "expects an integer"),
    ("--top-p", "0", "must be in (0, 1]"),
    ("--top-p", "1.01", "must be in (0, 1]"),
    ("--top-p", "nan", "must be a finite number"),
    ("--repetition-penalty", "0", "must be above 0"),
    ("--repetition-penalty", "-1", "must be above 0"),
    ("--repetition-penalty", "inf", "must be a finite number"),
    ("--seed", "-1", "must be at least 0"),
    ("--seed", str(2**63), "must be below"),
    ("--seed", "1e3", "expects an integer"),
]
BAD_FLAGS = [
    *(["generate", M, flag, value, fragment] for flag, value, fragment in SAMPLING),
    ["chat", M, "--temperature", "nan", "must be a finite number"],
    ["chat", M, "--max-new-tokens", "-5", "must be at least 1"],
    ["eval", M, "--window", "1", "--window must be at least 2"],
    ["eval", M, "--window", "0", "--window must be at least 2"],
    ["eval", M, "--stride", "0", "--stride must be at least 1"],
    ["eval", M, "--max-chars", "0", "must be at least 1"],
    ["eval", M, "--batch-size", "0", "must be at least 1"],
    ["eval", M, "--per-layer-windows", "0", "must be at least 1"],
    ["eval", M, "--per-layer-top", "-2", "must be at least 1"],
    ["bench", M, "--prompt-tokens", "0", "must be at least 1"],
    ["bench", M, "--new-tokens", "1", "must be at least 2"],
    ["bench", M, "--batch", "1", "0", "--batch must be at least 1"],
    ["bench", M, "--repeats", "0", "must be at least 1"],
    ["compress", M, "--recipe", "int8", "-o", "x", "--calibration-samples", "0", "must be at least 1"],
    ["compress", M, "--recipe", "int8", "-o", "x", "--calibration-len", "1", "must be at least 2"],
    ["compress", M, "--recipe", "int8", "-o", "x", "--eval-chars", "0", "must be at least 1"],
    ["compress", M, "--recipe", "int8", "-o", "x", "--window", "1", "must be at least 2"],
    ["embed", M, "--batch-size", "0", "must be at least 1"],
    ["train-probe", M, "--limit", "0", "must be at least 1"],
    ["train-probe", M, "--epochs", "-1", "must be at least 1"],
    ["export", M, "out", "--opset", "0", "must be at least 1"],
    ["prune-heads", M, "--fraction", "1", "must be in [0, 1)"],
    ["prune-heads", M, "--fraction", "nan", "must be a finite number"],
    ["prune-heads", M, "--steps", "0", "must be at least 1"],
    ["prune-heads", M, "--limit", "0", "must be at least 1"],
    ["prune-heads", M, "--heads", "{oops", "--heads is not valid JSON"],
    ["prune-heads", M, "--heads", "[1, 2]", "--heads must be a JSON object"],
    ["prune-heads", M, "--heads", '{"0": [-1]}', "--heads must be a JSON object"],
    ["eval-encoder", M, "--batch-size", "0", "must be at least 1"],
    ["serve", M, "--port", "-5", "--port must be at least 0"],
    ["serve", M, "--port", "70000", "--port must be below 65536"],
    ["serve", M, "--max-batch", "0", "must be at least 1"],
    ["serve", M, "--max-seq", "1", "must be at least 2"],
    ["serve", M, "--kv-budget-mb", "-1", "must be above 0"],
    ["serve", M, "--prefill-chunk", "0", "must be at least 1"],
    ["serve", M, "--max-queue", "-1", "must be at least 0"],
    ["serve", M, "--max-body-mb", "0", "must be above 0"],
    ["serve", M, "--stall-timeout", "nan", "must be a finite number"],
    ["serve", M, "--request-timeout", "inf", "must be a finite number"],
    ["serve", M, "--shutdown-timeout", "-1", "must be at least 0"],
    ["bench-serve", M, "--requests", "0", "must be at least 1"],
    ["bench-serve", M, "--concurrency", "-3", "must be at least 1"],
    ["bench-serve", M, "--max-tokens", "0", "must be at least 1"],
    ["bench", M, "--speculative", "prompt-lookup", "--prompts", "-1", "must be at least 1"],
    ["generate", M, "--tp", "0", "--tp must be at least 1"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=lambda a: " ".join(a[:1] + a[2:-1]))
def test_every_numeric_flag_is_validated(argv, fake_model, no_loading, capsys):
    *args, fragment = argv
    args = [str(fake_model) if a == M else a for a in args]
    assert main(args) == 2
    one_error_line(capsys, fragment)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", M, "--temperature", "0", "--top-p", "1", "--top-k", "0", "--seed", "0"],
        ["generate", M, "--seed", str(2**63 - 1), "--repetition-penalty", "0.001", "--max-new-tokens", "1"],
        ["eval", M, "--window", "2", "--stride", "1"],
        ["prune-heads", M, "--fraction", "0", "--heads", '{"1": [0, 2]}'],
        ["bench", M, "--new-tokens", "2", "--batch", "1", "8"],
    ],
)
def test_edge_values_are_accepted(argv):
    build_parser().parse_args(argv)


def test_stride_above_window_is_one_line(fake_model, no_loading, capsys):
    assert main(["eval", str(fake_model), "--window", "8", "--stride", "9"]) == 2
    one_error_line(capsys, "--stride (9) must not exceed --window (8)")


# --- output paths: checked before loading, never destroying anything ---------------------------------


def _unrelated(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("precious")
    return folder


def _outputs(tmp: Path, model: Path) -> list[tuple[list[str], str]]:
    """(argv after the model, expected fragment) for each output a command cannot or must not write."""
    (tmp / "a-file").write_text("precious")
    unrelated = str(_unrelated(tmp / "unrelated"))
    data = tmp / "train.tsv"
    data.write_text("sentence\tlabel\nfine\t1\n")
    compress = ["compress", "-", "--recipe", "int8", "--no-speed", "-o"]
    return [
        ([*compress, str(tmp / "a-file")], "is not a folder"),
        ([*compress, str(tmp / "a-file"), "--overwrite"], "is not a folder"),
        ([*compress, "/proc/leanformer-test"], "cannot write"),
        ([*compress, "/dev/null/x"], "/dev/null is not a folder"),
        ([*compress, unrelated], "--overwrite"),
        ([*compress, str(model), "--overwrite"], "input model's folder"),
        ([*compress, str(model.parent), "--overwrite"], "input model's folder"),
        ([*compress, ".", "--overwrite"], "current folder"),
        (["eval", "-", "--data", str(data), "--json", "/proc/leanformer.json"], "cannot write"),
        (["eval", "-", "--data", str(data), "--json", "/dev/null/x.json"], "not an existing folder"),
        (["eval", "-", "--data", str(data), "--json", unrelated], "is a folder"),
        (["eval", "-", "--data", str(data), "--json", str(model / "config.json")], "part of the input model"),
        (["bench", "-", "--json", str(tmp / "no-such-dir" / "b.json")], "not an existing folder"),
        (["embed", "-", "--output", "/proc/leanformer.npy"], "cannot write"),
        (["export", "-", unrelated], "--overwrite"),
        (["export", "-", "/dev/null/x"], "/dev/null is not a folder"),
        (["export", "-", str(model), "--overwrite"], "input model's folder"),
        (["prune-heads", "-", "--heads", '{"0": [0]}', "--output", unrelated], "--overwrite"),
        (["prune-heads", "-", "--heads", '{"0": [0]}', "--output", str(tmp / "a-file")], "is not a folder"),
        (["train-probe", "-", "--data", str(data), "--output", unrelated], "--overwrite"),
        (
            ["train-probe", "-", "--data", str(data), "--output", str(model.parent), "--overwrite"],
            "input model",
        ),
        (["eval-encoder", "-", "--json", unrelated], "is a folder"),
    ]


def test_output_paths_are_checked_before_loading(fake_model, tmp_path, no_loading, monkeypatch, capsys):
    work = _unrelated(tmp_path / "work")
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv, fragment in _outputs(tmp_path, fake_model):
        argv = [str(fake_model) if a == "-" else a for a in argv]
        assert main(argv) == 2, argv
        one_error_line(capsys, fragment)
    assert (tmp_path / "a-file").read_text() == "precious" and (work / "keep.txt").exists()
    assert (tmp_path / "unrelated" / "keep.txt").read_text() == "precious"
    assert (fake_model / "model.safetensors").read_bytes() == b"weights"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert set(before) <= set(after) and not [p for p in after if p.name.startswith(".")]  # no temp left


def test_compress_overwrite_replaces_and_reruns_replace_the_save(shared, tmp_path, capsys):
    model = Path(shutil.copytree(shared / "models/stories260K", tmp_path / "stories"))
    out = _unrelated(tmp_path / "out")
    argv = ["compress", str(model), "--recipe", "int8", "--no-speed", "-o", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, "--overwrite")
    assert main([*argv, "--overwrite"]) == 0 and not (out / "keep.txt").exists()
    assert main(argv) == 0  # an earlier leanformer save: replaced without --overwrite
    assert sorted(p.name for p in model.iterdir()) == ["stories260K.bin", "tok512.bin"]


# --- bad model files and prompts through the CLI -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama").save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("1 x 3", "space-separated token ids"),
        ("1 500", "outside this model's vocabulary"),
        ("-1", "token id -1"),
    ],
)
def test_bad_token_id_prompts(tiny_llama, capsys, prompt, fragment):
    assert main(["generate", str(tiny_llama), "--prompt", prompt, "--max-new-tokens", "2"]) == 2
    one_error_line(capsys, fragment)


def test_corrupt_model_file_is_one_line(tiny_llama, tmp_path, capsys):
    bad = Path(shutil.copytree(tiny_llama, tmp_path / "bad"))
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    assert main(["generate", str(bad), "--prompt", "1 2"]) == 2
    one_error_line(capsys, "model.safetensors")


def test_nan_model_warns_in_one_line(tmp_path, capsys):
    hf = tiny_hf_model("llama")
    with torch.no_grad():
        hf.lm_head.weight.fill_(float("nan"))
    hf.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' progress bar
    assert main(["generate", str(tmp_path), "--prompt", "1 2", "--max-new-tokens", "2", "--ignore-eos"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), lines
    assert any("NaN" in line and "weight" in line for line in lines)
    assert any("logits" in line for line in lines)


# --- end to end, as a user runs it ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["window", "compress-into-model"])
def test_end_to_end_exit_code_and_one_line(shared, tmp_path, case):
    model = Path(shutil.copytree(shared / "models/stories260K", tmp_path / "stories"))
    if case == "window":
        argv = ["eval", str(model), "--data", str(shared / "data/tinystories/sample.txt"), "--window", "1"]
    else:
        argv = ["compress", str(model), "--recipe", "int8", "-o", str(model), "--overwrite"]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    code = "import sys; from leanformer.cli.main import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert sorted(p.name for p in model.iterdir()) == ["stories260K.bin", "tok512.bin"]
    assert json.dumps(run.stderr)  # plain text
