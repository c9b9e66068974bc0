"""The fused attention kernel (kernels/attention.cpp) computes what torch's SDPA does, on every
instruction set the CPU offers, and the BERT encoder takes it only where it may."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer import kernels as K
from leanformer.models import bert

needs_kernels = pytest.mark.skipif(not K.available(), reason="kernels unavailable on this machine")

# (B, H, T, D): one token, short inputs on either side of each blocking switch (8, 16, 32 keys; 12 and
# 24 query rows), odd lengths, BERT's 256, head_dim 32 / 64 and ones that are not whole vectors.
SHAPES = [
    (2, 3, 1, 32),
    (3, 2, 8, 32),
    (2, 12, 13, 32),
    (2, 4, 17, 64),
    (3, 2, 33, 32),
    (2, 3, 63, 64),
    (1, 2, 97, 32),
    (2, 12, 256, 32),
    (1, 4, 130, 64),
    (2, 2, 37, 24),
    (1, 2, 70, 80),
    (2, 2, 33, 128),
    (1, 1, 9, 7),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(b: int, h: int, t: int, d: int):
    """q, k, v [B, H, T, D] as views of one [B, T, 3, H, D] tensor, the way the encoder slices them."""
    qkv = torch.randn(b, t, 3, h, d) * 2
    return qkv.permute(2, 0, 3, 1, 4)


def _key_mask(b: int, t: int, kind: str) -> torch.Tensor:
    if kind == "right-padded":  # what tokenizers produce: real tokens first
        lengths = torch.randint(1, t + 1, (b,))
        lengths[0] = t  # one row unpadded
        return torch.arange(t)[None] < lengths[:, None]
    mask = torch.rand(b, t) > 0.3  # holes anywhere (left padding, masked spans)
    mask[:, -1] = False
    mask[:, 0] = True
    return mask


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == want.shape
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= tol, err


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "right-padded", "holes"])
def test_matches_sdpa(shape, masking, isa):
    b, h, t, d = shape
    q, k, v = _qkv(*shape)
    mask = None if masking == "none" else _key_mask(b, t, masking)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    got = K.ext().attention(q, k, v, mask)
    assert got.shape == (b, t, h, d) and got.is_contiguous()
    _close(got.transpose(1, 2), want)


@needs_kernels
def test_contiguous_inputs_scale_and_fully_masked_rows(isa):
    q, k, v = (torch.randn(2, 3, 20, 32) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    _close(K.ext().attention(q, k, v, None, 0.3).transpose(1, 2), want)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False  # no key at all: zeros, like SDPA
    got = K.ext().attention(q, k, v, mask).transpose(1, 2)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    _close(got[:1], F.scaled_dot_product_attention(q[:1], k[:1], v[:1]))


@needs_kernels
def test_rejects_bad_inputs():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="float32"):
        K.ext().attention(q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match="shape"):
        K.ext().attention(q, q[:, :, :4], q)
    with pytest.raises(RuntimeError, match="key_mask"):
        K.ext().attention(q, q, q, torch.ones(1, 4, dtype=torch.bool))


@needs_kernels
@pytest.mark.parametrize("t", [16, 100])
def test_encoder_attention_paths(t, monkeypatch):
    """bert._attention: the kernel for CPU fp32 inference, SDPA while tracing or with autograd, and the
    same values on every path (kernels disabled: matmul up to SHORT_SEQ tokens, SDPA above)."""
    q, k, v = _qkv(2, 4, t, 32)
    mask = _key_mask(2, t, "right-padded")[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    calls = []
    real = K.ext().attention
    monkeypatch.setattr(K.ext(), "attention", lambda *a: calls.append(1) or real(*a), raising=False)
    with torch.inference_mode():
        _close(bert._attention(q, k, v, mask), want)
        _close(bert._attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))
    assert len(calls) == 2
    qg = q.clone().requires_grad_()
    _close(bert._attention(qg, k, v, mask).detach(), want)
    monkeypatch.setattr(K, "tracing", lambda: True)
    with torch.inference_mode():
        _close(bert._attention(q, k, v, mask), want)
    monkeypatch.setattr(K, "available", lambda: False)
    monkeypatch.setattr(K, "tracing", lambda: False)
    with torch.inference_mode():
        _close(bert._attention(q, k, v, mask), want)
    assert len(calls) == 2


@needs_kernels
@pytest.mark.parametrize("t", [5, 16, 70])
def test_encoder_forward_matches_sdpa_path(t, isa, monkeypatch):
    """A whole (random) BERT forward with padded rows: kernel path vs SDPA everywhere."""
    args = bert.ModelArgs(
        family="bert", vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=96, max_position_embeddings=80,
    )  # fmt: skip
    model = bert.Model(args).eval()
    ids = torch.randint(1, 50, (3, t))
    mask = torch.ones_like(ids)
    mask[1, t // 2 :] = 0
    with torch.inference_mode():
        got = model(ids, mask)
        monkeypatch.setattr(K, "available", lambda: False)
        monkeypatch.setattr(bert, "SHORT_SEQ", 0)  # SDPA at every length
        want = model(ids, mask)
    _close(got, want)
