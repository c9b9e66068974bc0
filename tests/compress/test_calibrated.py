"""GPTQ and AWQ: same modules as RTN, lower output error on correlated, outlier-heavy inputs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from leanformer.compress import (
    AWQ,
    GPTQ,
    Int4Linear,
    Int4WeightOnly,
    Int8Linear,
    Int8WeightOnly,
    apply,
    quantize_,
)
from leanformer.compress import kernels as K
from leanformer.compress.gptq import gptq_quantize_weight


def _quant_err(model, cfg, calib, heldout, err):
    m = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(heldout)
        quantize_(m, cfg, calib, progress=False)
        return err(m(heldout), ref), m


def test_gptq_identity_hessian_is_rtn():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    codes, s, z = gptq_quantize_weight(w, torch.eye(128), bits=4, group_size=32)
    s0, z0 = K.int4_params(w, 32)
    assert torch.equal(s, s0) and torch.equal(z, z0)
    assert torch.equal(codes, K.int4_codes(w, s0, z0, 32))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_weight_lowers_layer_error(act_order):
    torch.manual_seed(0)
    x = torch.randn(2048, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(2048, 128)  # correlated inputs
    w = torch.randn(64, 128)
    h = 2 * x.t() @ x / x.shape[0]
    codes, s, z = gptq_quantize_weight(w, h, 4, 32, act_order=act_order)
    s0, z0 = K.int4_params(w, 32)
    rtn = K.int4_dequant(K.int4_codes(w, s0, z0, 32), s0, z0, 32)
    gptq = K.int4_dequant(codes, s, z, 32)
    assert (x @ (w - gptq).t()).norm() < 0.6 * (x @ (w - rtn).t()).norm()


def test_gptq_and_awq_beat_rtn_int4(tiny_lm, calib, heldout, err):
    rtn, _ = _quant_err(tiny_lm, Int4WeightOnly(group_size=32), calib, heldout, err)
    gptq, m = _quant_err(tiny_lm, GPTQ(group_size=32, act_order=False), calib, heldout, err)
    assert isinstance(m.layers[1].down_proj, Int4Linear) and "group_size=32" in str(m)
    gptq_ao, _ = _quant_err(tiny_lm, GPTQ(group_size=32), calib, heldout, err)
    awq, m = _quant_err(tiny_lm, AWQ(group_size=32), calib, heldout, err)
    assert isinstance(m.layers[1].down_proj, Int4Linear)
    awq_gptq, _ = _quant_err(tiny_lm, AWQ(group_size=32, gptq=True), calib, heldout, err)
    assert gptq < 0.6 * rtn and gptq_ao < 0.6 * rtn, (gptq, gptq_ao, rtn)
    assert awq < 0.9 * rtn and awq_gptq < 0.6 * rtn, (awq, awq_gptq, rtn)


def test_gptq_int8_beats_rtn_int8(tiny_lm, calib, heldout, err):
    rtn, _ = _quant_err(tiny_lm, Int8WeightOnly(), calib, heldout, err)
    gptq, m = _quant_err(tiny_lm, GPTQ(bits=8), calib, heldout, err)
    assert isinstance(m.layers[0].qkv_proj, Int8Linear)
    assert gptq < rtn


def test_awq_folds_into_norms_and_reloads(tiny_lm, make_tiny_lm, calib, heldout, err):
    before = tiny_lm.layers[0].input_layernorm.weight.clone()
    _, m = _quant_err(tiny_lm, AWQ(group_size=32), calib, heldout, err)
    layer = m.layers[0]
    # qkv/gate_up read a norm's output: 1/s went into the norm weight, no per-call multiply
    assert layer.qkv_proj.input_scale is None and layer.gate_up_proj.input_scale is None
    assert not torch.equal(layer.input_layernorm.weight, before)
    # o_proj / down_proj have no foldable producer: the module keeps the scale
    assert any(x.input_scale is not None for x in (layer.o_proj, layer.down_proj))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = make_tiny_lm(seed=9).eval()
    apply(fresh, AWQ(group_size=32), structure_only=True)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(heldout), m(heldout))


class PostNormBlock(nn.Module):
    """BERT-style: the LayerNorm output feeds the FFN *and* the residual, so AWQ must not fold into it."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        h = self.ln(h)
        return h + self.down(torch.relu(self.up(h)))


def test_awq_does_not_fold_into_shared_norm(err):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), PostNormBlock(32), PostNormBlock(32)).eval()
    with torch.no_grad():
        model[0].weight[:, :3] *= 10
        for blk in model[1:]:
            blk.ln.weight.uniform_(0.5, 1.5)
            blk.ln.bias.normal_()
    calib = torch.randint(0, 64, (8, 16))
    ids = torch.randint(0, 64, (4, 16))
    rtn, _ = _quant_err(model, Int4WeightOnly(group_size=32), calib, ids, err)
    awq, m = _quant_err(model, AWQ(group_size=32), calib, ids, err)
    assert awq < 1.1 * rtn, (awq, rtn)  # a wrong fold would corrupt the residual (error ~1)
    assert m[1].up.input_scale is not None or torch.allclose(m[1].ln.weight, model[1].ln.weight)


def test_hf_llama_gptq_awq(hf_llama, err):
    calib = torch.randint(0, 128, (8, 24))
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = hf_llama(ids).logits
    errs = {}
    for name, cfg in [
        ("rtn", Int4WeightOnly(group_size=32)),
        ("gptq", GPTQ(group_size=32)),
        ("awq", AWQ(group_size=32)),
    ]:
        m = copy.deepcopy(hf_llama)
        quantize_(m, cfg, calib, progress=False)
        with torch.no_grad():
            errs[name] = err(m(ids).logits, ref)
        assert isinstance(m.model.layers[1].self_attn.k_proj, Int4Linear)
    assert errs["gptq"] < errs["rtn"] and errs["awq"] < errs["rtn"], errs
    # q/k/v share one input: AWQ gives them one scale, folded into input_layernorm
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.input_scale is None and attn.v_proj.input_scale is None


def test_calibration_list_and_plain_sequential(err):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    calib = [torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (12,))]
    ids = torch.randint(0, 50, (2, 10))
    for cfg in (GPTQ(group_size=32, targets=["*"], ignore=[]), AWQ(group_size=64, ignore=[])):
        e, m = _quant_err(model, cfg, calib, ids, err)
        assert isinstance(m[1], Int4Linear) and isinstance(m[3], Int4Linear)
        assert e < 0.2
