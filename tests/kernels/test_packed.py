"""kernels/packed.py: the oneDNN-packed Linears fall back to F.linear where the packed copy cannot serve
(autograd, autocast, another dtype) and let forward hooks see every call (calibration)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer.encoders.build import load_encoder
from leanformer.kernels.modules import FastLinear
from leanformer.kernels.packed import PackedLinear, can_pack
from tests.encoders.helpers import SENTENCES, tiny_encoder_dir

pytestmark = pytest.mark.skipif(
    not can_pack(torch.float32, torch.device("cpu")), reason="no oneDNN in this torch"
)


@pytest.mark.parametrize("cls", [PackedLinear, FastLinear])
def test_a_packed_linear_under_bf16_autocast_is_f_linear(cls):
    torch.manual_seed(0)
    lin = cls.from_linear(PackedLinear.from_linear(torch.nn.Linear(64, 48)))
    x = torch.randn(40, 64)  # past FastLinear's GEMV rows: the packed path's turn
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = lin(x), F.linear(x, lin.weight, lin.bias)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)


def test_forward_hooks_see_a_packed_encoder_linear(tmp_path):
    model, tok = load_encoder(tiny_encoder_dir(tmp_path, "BertModel", pooling=["mean"]), fast=True)
    qkv = model.layers[0].qkv
    assert getattr(qkv, "packed_weight", None) is not None
    seen = []
    handle = qkv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hooked = model(batch["input_ids"], batch["attention_mask"])
    handle.remove()
    with torch.inference_mode():
        plain = model(batch["input_ids"], batch["attention_mask"])
    assert len(seen) == 1 and torch.allclose(hooked, plain, atol=1e-5)
