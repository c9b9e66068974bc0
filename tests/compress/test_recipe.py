"""Recipes: ordered stages, JSON/YAML round trips, structure-only reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanformer.compress import (
    AWQ,
    GPTQ,
    Int4Linear,
    Int4WeightOnly,
    Int8Dynamic,
    Int8Linear,
    Int8WeightOnly,
    Recipe,
    apply,
    matches,
)
from leanformer.errors import LeanformerError

RECIPE = Recipe(
    [
        Int4WeightOnly(group_size=32, targets=["gate_up_proj", "down_proj"]),
        Int8WeightOnly(),  # everything else except lm_head
    ]
)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_file_round_trip(tmp_path, suffix):
    r = Recipe([*RECIPE.stages, GPTQ(bits=8, act_order=True), AWQ(group_size=64, clip=False), Int8Dynamic()])
    path = tmp_path / f"recipe{suffix}"
    r.save(path)
    assert Recipe.load(path) == r
    assert Recipe.from_dict(r.to_dict()) == r


def test_recipe_stages_in_order_and_reload(tiny_lm, make_tiny_lm, heldout, tmp_path):
    apply(tiny_lm, RECIPE, progress=False)
    assert isinstance(tiny_lm.layers[0].gate_up_proj, Int4Linear)
    assert isinstance(tiny_lm.layers[0].qkv_proj, Int8Linear)
    assert isinstance(tiny_lm.lm_head, nn.Linear)
    out = tiny_lm(heldout)
    RECIPE.save(tmp_path / "r.json")
    torch.save(tiny_lm.state_dict(), tmp_path / "w.pt")
    fresh = make_tiny_lm(seed=5).eval()
    apply(fresh, tmp_path / "r.json", structure_only=True)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(fresh(heldout), out)


def test_recipe_accepts_dicts_and_lists(tiny_lm):
    apply(tiny_lm, [{"type": "Int8WeightOnly", "targets": ["o_proj"]}])
    assert isinstance(tiny_lm.layers[1].o_proj, Int8Linear)
    apply(tiny_lm, {"version": 1, "stages": [{"type": "Int4WeightOnly", "group_size": 64}]})
    assert isinstance(tiny_lm.layers[1].qkv_proj, Int4Linear)


def test_recipe_errors(tmp_path):
    with pytest.raises(LeanformerError, match="not found"):
        Recipe.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(LeanformerError, match="cannot parse recipe"):
        Recipe.load(tmp_path / "bad.json")
    with pytest.raises(LeanformerError, match="newer"):
        Recipe.from_dict({"version": 99, "stages": []})


def test_matches():
    assert matches("model.lm_head", ["lm_head"])
    assert matches("model.layers.3.mlp.down_proj", ["mlp.*"])
    assert matches("model.layers.3.mlp.down_proj", ["layers.3.*"])
    assert not matches("model.layers.13.mlp.down_proj", ["layers.3.*"])
    assert matches("model.layers.3.self_attn.q_proj", ["re:.*attn\\.[qk]_proj"])
    assert matches("model.layers.3.self_attn.q_proj", ["re:[qk]_proj"])
    assert not matches("model.layers.3.self_attn.v_proj", ["re:[qk]_proj"])
