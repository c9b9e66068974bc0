"""Hostile input for `leanformer prune-weights` (issue #13, encoders): refused at parse time or before any
model is loaded, as one `error:` line, exit 2."""

from __future__ import annotations

import pytest

from leanformer.cli.main import main
from tests.hostile.test_cli import fake_model, no_loading, one_error_line  # noqa: F401 (fixtures)
from tests.hostile.test_cli_encoders import no_encoder_loading  # noqa: F401 (fixture)

M = "MODEL"
BAD = [
    ["--sparsity", "1", "must be in [0, 1)"],
    ["--sparsity", "-0.1", "must be in [0, 1)"],
    ["--sparsity", "nan", "must be a finite number"],
    ["--sparsity", "half", "expects a number"],
    ["--pattern", "4:2", "needs 0 < N < M"],
    ["--pattern", "0:4", "needs 0 < N < M"],
    ["--pattern", "2-4", "must be 'unstructured' or 'N:M'"],
    ["--pattern", "2:4:8", "must be 'unstructured' or 'N:M'"],
    ["--method", "random", "invalid choice"],
    ["--int8", "int4", "invalid choice"],
    ["--limit", "0", "--limit must be at least 1"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a[:-1]))
def test_prune_weights_flags_are_validated(argv, fake_model, no_encoder_loading, capsys):  # noqa: F811
    *args, fragment = argv
    assert main(["prune-weights", str(fake_model), *args]) == 2
    one_error_line(capsys, fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--pattern", "2:4", "--sparsity", "0.3"], "--pattern 2:4 means sparsity 0.5"),
        (["--sparsity", "0"], "prunes nothing"),
        (["--int8", "dynamic", "--sparse-storage"], "choose one"),
        (["--calibration", "/nonexistent/calib.txt"], "--calibration file not found"),
    ],
)
def test_prune_weights_combinations_refused_before_loading(
    args,
    fragment,
    fake_model,  # noqa: F811
    no_encoder_loading,  # noqa: F811
    capsys,
):
    assert main(["prune-weights", str(fake_model), *args]) == 2
    one_error_line(capsys, fragment)


def test_prune_weights_output_checked_before_loading(fake_model, tmp_path, no_encoder_loading, capsys):  # noqa: F811
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("precious")
    assert main(["prune-weights", str(fake_model), "--output", str(unrelated)]) == 2
    one_error_line(capsys, "--overwrite")
    assert (unrelated / "keep.txt").read_text() == "precious"
