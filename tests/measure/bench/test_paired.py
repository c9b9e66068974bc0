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


def test_unknown_recipe_fails_before_loading(tmp_path):
    with pytest.raises(LeanformerError, match="no recipe file or preset named 'nonsense'"):
        paired.main([str(tmp_path / "no-model-here"), "--recipe", "none", "nonsense"])
