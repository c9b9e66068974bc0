"""models/bert.py's float16 path on AVX512-FP16 CPUs: q/k/v, attention and its output projection stay fp16
between the fp16 matmuls (kernels/attention_h16*.cpp) and the hidden states match the fp32 model's, with
padding; where that path cannot run (a head mask, local attention, a chain that could overflow) the layer
takes the fp32 attention on the same q/k/v."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leanformer import kernels as K
from leanformer.encoders.build import build_encoder
from leanformer.kernels.h16 import H16Linear, native_f16
from leanformer.models.bert_attention import LongAttention
from tests.encoders.helpers import tiny_hf_encoder

pytestmark = pytest.mark.skipif(
    not native_f16(), reason="this CPU lacks AVX512-FP16 (or the kernels are not built)"
)


@pytest.fixture
def pair(tmp_path):
    """(fp32 model, the same with H16Linears), BERT with 4 heads of 16 (hidden 64), and a padded batch."""
    hf = tiny_hf_encoder("BertModel", max_position_embeddings=80)
    hf.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    fp32 = build_encoder(cfg, load_file(tmp_path / "model.safetensors"), fast=False)
    f16 = build_encoder(cfg, load_file(tmp_path / "model.safetensors"), dtype=torch.float16, fast=True)
    assert type(f16.layers[0].qkv) is H16Linear and f16.layers[0].head_dim == 16
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, cfg["vocab_size"], (4, 70), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 50:], mask[2, 3:], mask[3, 69:] = 0, 0, 0
    return fp32, f16, ids, mask


def _close(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Smallest cosine between the two models' hidden states at real tokens."""
    keep = mask.bool()
    return float(torch.nn.functional.cosine_similarity(a[keep], b[keep], dim=-1).min())


def _spy(monkeypatch, result=None):
    """Count attention_h16 calls; with result="none" make every call report a possible overflow."""
    calls, real = [], K.ext().attention_h16

    def attention_h16(*args):
        calls.append(args[0].shape)
        return None if result == "none" else real(*args)

    monkeypatch.setattr(K.ext(), "attention_h16", attention_h16)
    return calls


def test_fp16_attention_runs_between_fp16_matmuls(pair, monkeypatch):
    fp32, f16, ids, mask = pair
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        want, got = fp32(ids, mask), f16(ids, mask)
    assert len(calls) == len(f16.layers) and calls[0] == (4 * 70, 3 * 64)
    assert _close(got, want, mask) > 0.9999


def test_fp16_attention_overflow_falls_back_to_fp32_attention(pair, monkeypatch):
    fp32, f16, ids, mask = pair
    with torch.inference_mode():
        fast = f16(ids, mask)
        calls = _spy(monkeypatch, "none")
        slow = f16(ids, mask)  # q/k/v widened from fp16, the fp32 kernel, attn_out from fp32
        want = fp32(ids, mask)
    assert calls and _close(slow, want, mask) > 0.9999 and _close(slow, fast, mask) > 0.9999


@pytest.mark.parametrize("case", ["head_mask", "local", "grad"])
def test_fp16_attention_is_skipped_where_it_cannot_run(pair, monkeypatch, case):
    fp32, f16, ids, mask = pair
    calls = _spy(monkeypatch)
    kw: dict = {}
    if case == "head_mask":
        kw["head_mask"] = [torch.tensor([1.0, 0.0, 1.0, 0.5])] * len(f16.layers)
    elif case == "local":
        kw["attention"] = LongAttention.make("local", window=16)
    if case == "grad":
        got, want = f16(ids, mask), fp32(ids, mask)  # autograd: every Linear in fp32, SDPA
        assert torch.allclose(got, want, atol=1e-5)
    else:
        with torch.inference_mode():
            got, want = f16(ids, mask, **kw), fp32(ids, mask, **kw)
        assert _close(got, want, mask) > 0.9999
    assert calls == []


def test_head_size_not_a_multiple_of_16_takes_the_fp32_attention(tmp_path, monkeypatch):
    """8 heads of 8 (hidden 64): the fp16 Linears still run, the attention in fp32 on the fp16 q/k/v's
    fp32 twin (no attention_h16 call), and the hidden states match the fp32 model's."""
    hf = tiny_hf_encoder("BertModel", num_attention_heads=8)
    hf.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    fp32 = build_encoder(cfg, load_file(tmp_path / "model.safetensors"), fast=False)
    f16 = build_encoder(cfg, load_file(tmp_path / "model.safetensors"), dtype=torch.float16, fast=True)
    assert f16.layers[0].head_dim == 8 and type(f16.layers[0].qkv) is H16Linear
    calls = _spy(monkeypatch)
    ids = torch.randint(5, cfg["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.inference_mode():
        got, want = f16(ids, mask), fp32(ids, mask)
    assert calls == [] and _close(got, want, mask) > 0.9999


def test_output_projections_normalize_in_the_kernel_and_hand_fp16_on(pair, monkeypatch):
    """Each layer's two output projections run linear_h16_norm (residual + LayerNorm + the fp16 copy in one
    call), the q/k/v and FFN-in matmuls of every layer after the first read that fp16 copy, and the hidden
    states are bit for bit those of the separate kernels (fused then layer_norm_, fp32 inputs converted)."""
    fp32, f16, ids, mask = pair
    real_norm, real_to = K.ext().linear_h16_norm, K.ext().linear_h16_to_h16
    norms, inputs = [], []
    monkeypatch.setattr(K.ext(), "linear_h16_norm", lambda *a: norms.append(1) or real_norm(*a))
    monkeypatch.setattr(K.ext(), "linear_h16_to_h16", lambda *a: inputs.append(a[0].dtype) or real_to(*a))
    with torch.inference_mode():
        got = f16(ids, mask)
        layers = len(f16.layers)
        assert len(norms) == 2 * layers
        assert inputs == [torch.float32] + [torch.float16] * (2 * layers - 1)
        monkeypatch.setattr(H16Linear, "fused_norm", lambda *a: None)  # the separate kernels
        assert torch.equal(f16(ids, mask), got)
        assert _close(got, fp32(ids, mask), mask) > 0.9999


def test_a_hooked_layer_sees_its_call_and_the_result_is_unchanged(pair):
    fp32, f16, ids, mask = pair
    with torch.inference_mode():
        plain = f16(ids, mask)
        seen = []
        handle = f16.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        try:
            hooked = f16(ids, mask)
        finally:
            handle.remove()
    assert seen == [(4, 70, 64)] and torch.equal(hooked, plain)
