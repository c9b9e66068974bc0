"""Encoder attention on fp16 q/k/v (kernels/attention_h16*.cpp): softmax(q k^T / sqrt(D)) v within fp16
arithmetic's error of the exact attention of the same fp16 values, at every query-block and key-tile
remainder, with key masks (trailing pads, gaps, every key masked), both output dtypes, the reported max
|out|, and None where a chain could overflow.

The error scale: scores are fp16 sums of D products, so a logit of size L carries ~2^-11 L of rounding
and the probabilities ~that relative error. The tests use q/k/v ~ N(0, 1) (logits ~ N(0, 1), as in trained
encoders: all-MiniLM-L6-v2's embeddings move by 4e-7 in 1 - cosine, docs/BENCHMARKS.md); measured
1-3e-3 of the output's norm (5e-4 for P V alone, with scores in fp32)."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K
from leanformer.kernels.h16 import native_f16

needs_f16 = pytest.mark.skipif(
    not native_f16(), reason="this CPU lacks AVX512-FP16 (or the kernels are not built)"
)


def _reference(qkv16: torch.Tensor, b: int, h: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Exact attention (float64) of the fp16 values: [B * T, H * D]."""
    t, d = qkv16.shape[0] // b, qkv16.shape[1] // (3 * h)
    q, k, v = qkv16.double().view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
    s = q @ k.transpose(-1, -2) / d**0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)  # a row with every key masked: zeros
    return (p @ v).transpose(1, 2).reshape(b * t, h * d)


def _qkv(b: int, t: int, h: int, d: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(b * t, 3 * h * d) * scale).half()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-12))


@needs_f16
@pytest.mark.parametrize(
    "b,t,h,d", [(1, 1, 1, 16), (2, 7, 3, 32), (3, 16, 2, 32), (2, 17, 2, 48), (2, 33, 2, 64), (1, 100, 2, 80),
                (2, 256, 4, 32), (1, 130, 1, 128)],
)  # fmt: skip
@pytest.mark.parametrize("fp16_out", [True, False])
def test_attention_h16_matches_exact_attention(b, t, h, d, fp16_out):
    torch.manual_seed(t * d + h)
    qkv = _qkv(b, t, h, d)
    out, amax = K.ext().attention_h16(qkv, b, h, None, float(qkv.abs().max()), fp16_out)
    want = _reference(qkv, b, h, None)
    assert out.shape == (b * t, h * d) and out.dtype == (torch.float16 if fp16_out else torch.float32)
    assert _rel(out, want) < 5e-3
    if fp16_out:
        assert amax == pytest.approx(float(want.abs().max()), rel=5e-3)


@needs_f16
@pytest.mark.parametrize("t", [5, 16, 31, 64, 200])
def test_attention_h16_key_mask(t):
    torch.manual_seed(t)
    b, h, d = 4, 2, 32
    qkv = _qkv(b, t, h, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t // 2 :] = False  # trailing pads
    mask[2, 1 : max(2, t // 3)] = False  # a gap before the last key
    mask[3, :] = False  # every key masked: zeros
    out, _ = K.ext().attention_h16(qkv, b, h, mask, float(qkv.abs().max()), False)
    want = _reference(qkv, b, h, mask)
    assert _rel(out, want) < 5e-3
    assert torch.all(out.view(b, t, -1)[3] == 0)


@needs_f16
def test_attention_h16_reads_rows_of_a_wider_matrix():
    """q/k/v as the fused matmul leaves them: a view whose rows are longer than 3 * H * D is refused, a
    contiguous [B * T, 3 * H * D] is read as [q heads | k heads | v heads]."""
    b, t, h, d = 2, 40, 3, 32
    qkv = _qkv(b, t, h, d)
    out, _ = K.ext().attention_h16(qkv, b, h, None, float(qkv.abs().max()), True)
    q, k, v = qkv.float().view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, h * d)
    assert _rel(out, sdpa.double()) < 5e-3
    with pytest.raises(RuntimeError, match="3 \\* H \\* D"):
        K.ext().attention_h16(torch.cat([qkv, qkv[:, :16]], 1), b, h, None, 1.0, True)


@needs_f16
def test_attention_h16_overflow_guard_and_bad_input():
    b, t, h, d = 1, 8, 1, 16
    qkv = _qkv(b, t, h, d)
    assert K.ext().attention_h16(qkv, b, h, None, 1000.0, True) is None  # 64 * 1000 > 30000
    assert K.ext().attention_h16(qkv, b, h, None, 50.0, True) is None  # a score: 16 * 50^2 > 30000
    assert K.ext().attention_h16(qkv, b, h, None, float("inf"), True) is None
    assert K.ext().attention_h16(qkv, b, h, None, float("nan"), True) is None  # a NaN in q/k/v
    with pytest.raises(RuntimeError, match="float16"):
        K.ext().attention_h16(qkv.float(), b, h, None, 1.0, True)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        K.ext().attention_h16(torch.zeros(8, 3 * 8, dtype=torch.half), 1, 1, None, 1.0, True)
    with pytest.raises(RuntimeError, match="key_mask"):
        K.ext().attention_h16(qkv, b, h, torch.ones(b, t + 1, dtype=torch.bool), 1.0, True)
