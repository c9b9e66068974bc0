"""bench.paired: every variant measured in one process, ratios per round."""

from __future__ import annotations

import pytest

from leanformer import LeanformerError
from leanformer.measure.bench import paired


def test_paired_ratios_on_a_tiny_model(tiny_dirs, tmp_path):
    out = paired.main(
        [str(tiny_dirs["llama"]), "--recipe", "none", "int8", "--batch", "1", "2", "--rounds", "2",
         "--prompt-tokens", "8", "--new-tokens", "6", "--json", str(tmp_path / "p.json")]
    )  # fmt: skip
    rows = {(r["recipe"], r["batch"]): r for r in out["rows"]}
    assert set(rows) == {("none", 1), ("int8", 1), ("none", 2), ("int8", 2)}
    assert rows["none", 1]["ratio"] == 1.0 and all(r["tok_s"] > 0 for r in rows.values())
    assert len(out["speeds"]["int8|b2"]) == 2 and (tmp_path / "p.json").exists()


def test_the_ceiling_is_the_first_recipes(tiny_dirs):
    """The "% of the ceiling" line is about the first recipe: its ceiling counts that model's bytes (an int8
    model streams ~a quarter of the fp32 base's), not the base's."""
    from leanformer.loading import load
    from leanformer.measure.bench.runner import _nbytes

    base, _ = load(tiny_dirs["llama"])
    argv = [
        str(tiny_dirs["llama"]),
        "--batch",
        "1",
        "--rounds",
        "1",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "2",
    ]
    plain = paired.main([*argv, "--recipe", "none", "int8"])
    int8 = paired.main([*argv, "--recipe", "int8", "none"])
    assert plain["ceiling_bytes"] == _nbytes(base)
    assert int8["ceiling_bytes"] < 0.6 * plain["ceiling_bytes"]


def test_unknown_recipe_fails_before_loading(tmp_path):
    with pytest.raises(LeanformerError, match="no recipe file or preset named 'nonsense'"):
        paired.main([str(tmp_path / "no-model-here"), "--recipe", "none", "nonsense"])
