"""Hostile input for the encoder flags of issue #15 (embed --attention ...) and #13 (prune-encoder):
refused at parse time or before any model is loaded, as one `error:` line, exit 2."""

from __future__ import annotations

import pytest

from leanformer.cli.main import main
from tests.hostile.test_cli import fake_model, no_loading, one_error_line  # noqa: F401 (fixtures)

M = "MODEL"
BAD = [
    ["embed", M, "--attention", "sparse", "invalid choice"],
    ["embed", M, "--attention", "local", "--window", "0", "--window must be at least 1"],
    ["embed", M, "--attention", "local", "--window", "1e9", "expects an integer"],
    ["embed", M, "--attention", "lsh", "--bucket-size", "-4", "--bucket-size must be at least 1"],
    ["embed", M, "--attention", "lsh", "--hashes", "0", "--hashes must be at least 1"],
    ["embed", M, "--attention", "lsh", "--hashes", "17", "--hashes must be below 17"],
    ["embed", M, "--max-length", "1", "--max-length must be at least 2"],
    ["embed", M, "--max-length", "nan", "expects an integer"],
    ["embed", M, "--positions", "wrap", "invalid choice"],
    ["embed", M, "--dtype", "float64", "invalid choice"],
    ["prune-encoder", M, "--fraction", "1", "must be in [0, 1)"],
    ["prune-encoder", M, "--fraction", "nan", "must be a finite number"],
    ["prune-encoder", M, "--head-fraction", "-0.1", "must be in [0, 1)"],
    ["prune-encoder", M, "--multiple", "0", "--multiple must be at least 1"],
    ["prune-encoder", M, "--steps", "0", "--steps must be at least 1"],
    ["prune-encoder", M, "--limit", "0", "--limit must be at least 1"],
    ["prune-encoder", M, "--method", "random", "invalid choice"],
]


@pytest.fixture
def no_encoder_loading(no_loading, monkeypatch):  # noqa: F811
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was reported")

    monkeypatch.setattr("leanformer.encoders.build.load_encoder", loaded)


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a[:1] + a[2:-1]))
def test_encoder_flags_are_validated(argv, fake_model, no_encoder_loading, capsys):  # noqa: F811
    *args, fragment = argv
    assert main([str(fake_model) if a == M else a for a in args]) == 2
    one_error_line(capsys, fragment)


def test_combinations_refused_before_loading(fake_model, tmp_path, no_encoder_loading, capsys):  # noqa: F811
    m = str(fake_model)
    for argv, fragment in [
        (["embed", m, "--attention", "local", "--backend", "onnxruntime"], "--backend torch only"),
        (["embed", m, "--max-length", "2048", "--backend", "onnxruntime"], "--backend torch only"),
        (["embed", m, "--dtype", "bfloat16", "--backend", "onnxruntime"], "runs on the torch backend"),
        (["embed", m, "--dtype", "float16", "--backend", "onnxruntime"], "runs on the torch backend"),
        (
            ["prune-encoder", m, "--calibration", str(tmp_path / "missing.txt")],
            "--calibration file not found",
        ),
    ]:
        assert main(argv) == 2, argv
        one_error_line(capsys, fragment)
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("precious")
    assert main(["prune-encoder", m, "--output", str(unrelated)]) == 2
    one_error_line(capsys, "--overwrite")
    assert (unrelated / "keep.txt").read_text() == "precious"


def test_embed_float16_needs_avx512_fp16(fake_model, no_encoder_loading, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr("leanformer.kernels.h16.native_f16", lambda: False)
    assert main(["embed", str(fake_model), "--dtype", "float16"]) == 2
    one_error_line(capsys, "AVX512-FP16")
