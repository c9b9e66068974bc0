"""quantize_ on a tiny model: module swaps, accuracy, state-dict round trips, selection, errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from leanformer.compress import (
    AWQ,
    CONFIG_TYPES,
    GPTQ,
    BF16Linear,
    BF16WeightOnly,
    F16Linear,
    F16WeightOnly,
    Int4Linear,
    Int4WeightOnly,
    Int8Dynamic,
    Int8DynamicLinear,
    Int8Linear,
    Int8WeightOnly,
    QuantConfig,
    apply,
    quantize_,
)
from leanformer.errors import LeanformerError

RTN = [
    (Int8WeightOnly(), Int8Linear, 0.02),
    (Int4WeightOnly(group_size=32), Int4Linear, 0.2),
    (Int8Dynamic(min_tokens=4), Int8DynamicLinear, 0.05),
    (BF16WeightOnly(), BF16Linear, 0.01),
    (F16WeightOnly(), F16Linear, 0.01),
]


def _n_linear(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize(
    "cfg,cls,tol", RTN, ids=lambda v: type(v).__name__ if isinstance(v, QuantConfig) else ""
)
def test_quantize_swaps_and_stays_close(tiny_lm, heldout, err, cfg, cls, tol):
    ref = tiny_lm(heldout)
    quantize_(tiny_lm, cfg)
    assert _n_linear(tiny_lm, cls) == 8  # 4 per layer, lm_head ignored by default
    assert isinstance(tiny_lm.lm_head, nn.Linear)
    assert err(tiny_lm(heldout), ref) < tol
    assert err(tiny_lm(heldout[:1, :1]), ref[:1, :1]) < tol  # decode-sized call (other kernel path)
    text = str(tiny_lm)
    assert any(
        s in text
        for s in ("bits=4, group_size=32", "bits=8", "int8 per_token", "weight=bfloat16", "weight=float16")
    )


@pytest.mark.parametrize(
    "cfg,cls,tol", RTN, ids=lambda v: type(v).__name__ if isinstance(v, QuantConfig) else ""
)
def test_state_dict_round_trip_into_structure_only(tiny_lm, make_tiny_lm, heldout, cfg, cls, tol):
    quantize_(tiny_lm, cfg)
    out = tiny_lm(heldout)
    buf = io.BytesIO()
    torch.save(tiny_lm.state_dict(), buf)
    fresh = make_tiny_lm(seed=123).eval()  # different random weights: everything must come from the file
    apply(fresh, [cfg], structure_only=True)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(heldout), out)


def test_structure_only_on_meta_then_assign(tiny_lm, make_tiny_lm, heldout):
    quantize_(tiny_lm, Int4WeightOnly(group_size=64))
    sd = tiny_lm.state_dict()
    with torch.device("meta"):
        fresh = make_tiny_lm()
    apply(fresh, Int4WeightOnly(group_size=64), structure_only=True)
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(heldout), tiny_lm(heldout))


def test_int4_state_dict_is_small_and_portable(tiny_lm):
    quantize_(tiny_lm, Int4WeightOnly(group_size=32))
    sd = tiny_lm.state_dict()
    q = sd["layers.0.gate_up_proj.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (256, 32)  # [N, K/2]: two codes per byte
    assert sd["layers.0.gate_up_proj.scales"].shape == (256, 2)
    n_bytes = sum(t.numel() * t.element_size() for k, t in sd.items() if k.startswith("layers."))
    n_weights = sum(m.in_features * m.out_features for m in tiny_lm.modules() if isinstance(m, Int4Linear))
    bits = (n_bytes - sum(sd[k].numel() * 4 for k in sd if "layernorm" in k)) * 8 / n_weights
    assert 4.9 < bits < 5.1  # 4 bits + bf16 scale and zero per 32 weights = 5.0


def test_int8_state_dict_keys(tiny_lm):
    quantize_(tiny_lm, Int8WeightOnly())
    sd = tiny_lm.state_dict()
    assert sd["layers.1.down_proj.weight_int8"].dtype == torch.int8
    assert sd["layers.1.down_proj.scales"].dtype == torch.bfloat16


def test_bf16_model_and_device_moves(tiny_lm, heldout, err):
    ref = tiny_lm(heldout)
    quantize_(tiny_lm, Int4WeightOnly(group_size=32))
    scales = tiny_lm.layers[0].qkv_proj.scales.clone()
    # scales/zeros keep their dtype (fp16 here, the bf16 values of RTN at group 32: compact_scales), never
    # rounded by a model cast; codes intact
    assert scales.dtype == torch.float16
    tiny_lm.to(torch.bfloat16)
    assert tiny_lm.layers[0].qkv_proj.scales.dtype == torch.float16
    out = tiny_lm(heldout)
    assert out.dtype == torch.bfloat16
    assert err(out.float(), ref) < 0.25
    assert tiny_lm(heldout[:1, :2]).dtype == torch.bfloat16  # decode-sized call (kernel path)
    tiny_lm.to("cpu").float()
    assert torch.equal(tiny_lm.layers[0].qkv_proj.scales, scales)


def test_bias_and_odd_shapes(err):
    """Bias kept; out_features not a multiple of 16 and in_features not a multiple of 8 still work."""
    torch.manual_seed(0)
    for lin in (nn.Linear(64, 10), nn.Linear(36, 24)):
        x = torch.randn(3, 5, lin.in_features)
        ref = lin(x)
        for cfg in (
            Int8WeightOnly(targets=["*"]),
            Int8Dynamic(min_tokens=4),
            Int4WeightOnly(group_size=32, pad=True),
        ):
            m = nn.Sequential(lin)
            quantize_(m, cfg)
            assert m[0].bias is not None
            assert err(m(x), ref) < (0.15 if isinstance(cfg, Int4WeightOnly) else 0.03), cfg
            m[0] = lin


def test_targets_and_ignore(tiny_lm):
    quantize_(
        tiny_lm, Int4WeightOnly(group_size=32, targets=["mlp*", "*_proj"], ignore=["layers.1.*", "o_proj"])
    )
    assert isinstance(tiny_lm.layers[0].qkv_proj, Int4Linear)
    assert isinstance(tiny_lm.layers[0].down_proj, Int4Linear)
    assert isinstance(tiny_lm.layers[0].o_proj, nn.Linear)
    assert isinstance(tiny_lm.layers[1].qkv_proj, nn.Linear)
    quantize_(tiny_lm, Int8WeightOnly(targets=["re:layers\\.\\d\\.(qkv|o)_proj", "lm_head"], ignore=[]))
    assert isinstance(tiny_lm.layers[1].qkv_proj, Int8Linear) and isinstance(
        tiny_lm.layers[0].o_proj, Int8Linear
    )
    assert isinstance(tiny_lm.lm_head, Int8Linear)
    assert isinstance(tiny_lm.layers[1].gate_up_proj, nn.Linear)


@pytest.mark.parametrize("name", sorted(CONFIG_TYPES))
def test_config_dict_round_trip(name):
    cfg = CONFIG_TYPES[name](targets=["layers.*"], ignore=["lm_head", "re:.*down.*"])
    d = cfg.to_dict()
    assert d["type"] == name
    assert QuantConfig.from_dict(d) == cfg


def test_errors(tiny_lm):
    with pytest.raises(
        LeanformerError, match="unknown config type 'Int3'.*known: AWQ, BF16WeightOnly, F16WeightOnly, GPTQ"
    ):
        QuantConfig.from_dict({"type": "Int3"})
    with pytest.raises(LeanformerError, match="has no field"):
        QuantConfig.from_dict({"type": "GPTQ", "bitz": 4})
    with pytest.raises(LeanformerError, match="group_size must be one of"):
        quantize_(tiny_lm, Int4WeightOnly(group_size=48))
    with pytest.raises(
        LeanformerError, match="does not divide in_features 64 of layers.0.qkv_proj; use group_size=64"
    ):
        quantize_(tiny_lm, Int4WeightOnly(group_size=128))
    with pytest.raises(LeanformerError, match="no nn.Linear matches"):
        quantize_(tiny_lm, Int8WeightOnly(targets=["nothing"]))
    with pytest.raises(LeanformerError, match="needs calibration"):
        quantize_(tiny_lm, GPTQ(group_size=32))
    with pytest.raises(LeanformerError, match="bits must be 4 or 8"):
        quantize_(tiny_lm, AWQ(bits=3))
    with pytest.raises(LeanformerError, match="list of patterns"):
        quantize_(tiny_lm, Int8WeightOnly(targets="*"))
    for msg in ("unknown", "has no field"):  # one-line messages for the CLI
        try:
            QuantConfig.from_dict({"type": "Int3"} if msg == "unknown" else {"type": "AWQ", "x": 1})
        except LeanformerError as e:
            assert "\n" not in str(e)


def test_pad_group_size(tiny_lm, heldout, err):
    ref = tiny_lm(heldout)
    quantize_(tiny_lm, Int4WeightOnly(group_size=128, pad=True))
    assert "padded_in" in str(tiny_lm.layers[0].qkv_proj)
    assert err(tiny_lm(heldout), ref) < 0.3


def test_presets_and_load_recipe(tmp_path):
    from leanformer.compress import PRESETS, Recipe, load_recipe

    assert load_recipe("int8").stages == [Int8WeightOnly()]
    assert set(PRESETS) >= {"int8", "int4", "w8a8", "gptq-int4", "awq-int4"}
    Recipe([Int8Dynamic()]).save(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml").stages == [Int8Dynamic()]
    Recipe([Int8WeightOnly()]).save(tmp_path / "r.yaml")  # replaced whole, no temp file left behind
    assert load_recipe(tmp_path / "r.yaml").stages == [Int8WeightOnly()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    with pytest.raises(LeanformerError, match="presets: int8"):
        load_recipe("int5")


def test_deepcopy_and_meta_state_dict(tiny_lm, make_tiny_lm, heldout):
    import copy

    quantize_(tiny_lm, Int8Dynamic(min_tokens=1))
    out = tiny_lm(heldout)  # builds the opaque oneDNN-packed weight
    assert torch.equal(copy.deepcopy(tiny_lm)(heldout), out)
    with torch.device("meta"):
        fresh = make_tiny_lm()
    apply(fresh, Int4WeightOnly(group_size=32), structure_only=True)
    sd = fresh.state_dict()  # a loader's "expected" shapes, before any weights exist
    assert sd["layers.0.qkv_proj.qweight"].shape == (192, 32) and sd["layers.0.qkv_proj.qweight"].is_meta


def test_recipe_recorded_on_hf_style_config(tiny_lm):
    tiny_lm.config = {"model_type": "llama"}
    quantize_(tiny_lm, Int8WeightOnly(targets=["o_proj"]))
    quantize_(tiny_lm, Int4WeightOnly(group_size=32))
    stages = tiny_lm.config["leanformer"]["recipe"]["stages"]
    assert [s["type"] for s in stages] == ["Int8WeightOnly", "Int4WeightOnly"]
