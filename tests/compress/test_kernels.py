"""The packed kernels compute exactly what our integer formats say (within bf16 rounding)."""

from __future__ import annotations

import pytest
import torch

from leanformer.compress import kernels as K


def _bf16_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float() @ w.t()


@pytest.mark.parametrize("n,k", [(64, 96), (48, 576), (7, 33)])
def test_int8_symmetric_round_trip(n, k, err):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q, s = K.int8_symmetric(w)
    assert (s.to(torch.bfloat16).float() == s).all()  # scales already bf16-exact
    assert int(q.abs().max()) <= 127
    assert err(q.float() * s[:, None], w) < 0.01  # and int8 itself is accurate


@pytest.mark.parametrize("group", K.INT4_GROUP_SIZES)
def test_int4_kernel_matches_dequant(group, err):
    torch.manual_seed(0)
    n, k = 32, 512
    w = torch.randn(n, k) + 0.5  # offset so the float zero point matters
    s, z = K.int4_params(w, group)
    codes = K.int4_codes(w, s, z, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    deq = K.int4_dequant(codes, s, z, group)
    assert err(deq, w) < 0.12  # 4-bit RTN
    packed = K.int4_pack(codes, torch.device("cpu"))
    sz = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()
    x = torch.randn(3, k)
    y = K.int4_mm(x.to(torch.bfloat16), packed, group, sz).float()
    assert err(y, _bf16_ref(x, deq)) < 1e-2


def test_int4_zero_convention_is_float_offset():
    """(q - 8) * scale + zero: a group whose weights are all equal dequantizes to them exactly."""
    w = torch.full((16, 32), 0.75)
    s, z = K.int4_params(w, 32)
    codes = K.int4_codes(w, s, z, 32)
    packed = K.int4_pack(codes, torch.device("cpu"))
    sz = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()
    y = K.int4_mm(torch.eye(32, dtype=torch.bfloat16), packed, 32, sz).float()
    assert torch.allclose(y, torch.full((32, 16), 0.75), atol=1e-2)


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (48, 256), dtype=torch.uint8)
    assert torch.equal(K.unpack_nibbles(K.pack_nibbles(codes)), codes)


def test_int4_partial_last_group():
    w = torch.randn(16, 80)  # 80 = 64 + 16: the last group has 16 real columns
    s, z = K.int4_params(w, 64)
    assert s.shape == (16, 2)
    deq = K.int4_dequant(K.int4_codes(w, s, z, 64), s, z, 64)
    assert (deq - w).abs().max() <= s.max() * 0.51 + 1e-3


def test_int8_dynamic_kernel_exact():
    """oneDNN int8 GEMM with our 7-bit-safe weights equals the integer product exactly."""
    torch.manual_seed(0)
    w = torch.randn(40, 72)
    q, s = K.int8_symmetric(w, qmax=63 if not K.cpu_has_vnni() else 127, bf16_scales=False)
    x = torch.randn(20, 72) * 3
    xq, xs = K.quantize_rows_int8(x)
    packed = K.onednn_prepack(q)
    y = K.int8_dynamic_mm_cpu(xq, packed, s, torch.zeros(40, dtype=torch.int64))
    exact = (xq.float() @ q.float().t()) * s
    assert torch.allclose(y, exact, rtol=1e-5, atol=1e-3)
    assert ((xq.float() * xs - x).abs() <= xs / 2 + 1e-6).all()  # per-token rounding error bound


def test_missing_kernel_raises():
    from leanformer.errors import LeanformerError

    with pytest.raises(LeanformerError, match="not available on meta"):
        K.require_kernel("aten::_weight_int8pack_mm", torch.device("meta"), "int8 weight-only matmul")
