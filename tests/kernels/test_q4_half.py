"""int4 kernels reading scales / zero points held as fp16 (kernels/q4_codes.h; an Int4Linear holds a GGUF's
fp16 block scales so: compress/int4.py compact_scales) instead of fp32 arrays [N, G]: every path (the
int8-activation GEMV on each act ISA, at group 32 reading fp16 in its loops and at other groups through
the per-chunk decode; the fp32-activation GEMV on each ISA; the dequantizer; the prefill GEMM) gives bit
for bit what it gives on the fp32 arrays of the same values. The fused step and the module:
tests/compress/test_int4_half.py."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")

# (n, kp, group): 576 at group 32 = one 512-column span and one odd 64-column chunk (whose zero points
# the AVX-512 VNNI loop takes in place); 1088 two spans + one chunk; 1536 three spans; 608 a span, a
# chunk and a last 32 columns; 96 no span, a chunk and a last 32; group 64 / 128: the per-chunk decode
SHAPES = [
    (301, 576, 32),
    (37, 1088, 32),
    (19, 1536, 32),
    (23, 608, 32),
    (45, 96, 32),
    (29, 576, 64),
    (13, 1024, 128),
]
# which of scales / zeros are fp16 ("none": symmetric codes, no zero points)
HOLDS = ["s16-z16", "s16-z32", "s32-z16", "s16-none"]


def _operands(n: int, kp: int, group: int, hold: str, seed: int = 0):
    """(codes, fp32 scales, fp32 zeros or None, the same as held by `hold`): fp16 values throughout."""
    gen = torch.Generator().manual_seed(seed)
    g = kp // group
    s = (torch.exp(torch.rand(n, g, generator=gen) * 4.6 - 2.3) * 1e-2).half().float()
    z = None if hold.endswith("none") else ((torch.rand(n, g, generator=gen) * 15 - 7) * s).half().float()
    wq = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=gen)
    hs = s.half() if hold.startswith("s16") else s
    hz = None if z is None else z.half() if "z16" in hold else z
    return wq, s, z, hs, hz


@pytest.mark.parametrize("n,kp,group", SHAPES)
@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 19])
def test_linear_q4_i8_half_equals_fp32_arrays(act_isa, n, kp, group, hold, rows):  # noqa: F811
    wq, s, z, hs, hz = _operands(n, kp, group, hold)
    x = torch.randn(rows, kp - 7)  # K < Kp: the input zero-padded
    bias = torch.randn(n)
    e = K.ext()
    assert torch.equal(e.linear_q4_i8(x, wq, hs, hz, group, bias), e.linear_q4_i8(x, wq, s, z, group, bias))


@pytest.mark.parametrize("n,kp,group", SHAPES)
@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_q4_half_equals_fp32_arrays(isa, n, kp, group, hold, rows):  # noqa: F811
    wq, s, z, hs, hz = _operands(n, kp, group, hold)
    x = torch.randn(rows, kp)
    e = K.ext()
    assert torch.equal(e.linear_q4(x, wq, hs, hz, group, None), e.linear_q4(x, wq, s, z, group, None))


@pytest.mark.parametrize("n,kp,group", SHAPES)
@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_q4_half_equals_fp32_arrays(n, kp, group, hold, bf16):
    wq, s, z, hs, hz = _operands(n, kp, group, hold)
    e = K.ext()
    assert torch.equal(e.dequant_q4(wq, hs, hz, group, kp, bf16), e.dequant_q4(wq, s, z, group, kp, bf16))


@pytest.mark.parametrize("n,kp,group", SHAPES)
@pytest.mark.parametrize("hold", HOLDS)
def test_gemm_q4_i8_half_equals_fp32_arrays(act_isa, n, kp, group, hold):  # noqa: F811
    wq, s, z, hs, hz = _operands(n, kp, group, hold)
    x = torch.randn(40, kp)
    e = K.ext()
    assert torch.equal(e.gemm_q4_i8(x, wq, hs, hz, group), e.gemm_q4_i8(x, wq, s, z, group))


def test_other_dtypes_are_refused():
    wq = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        K.ext().linear_q4_i8(torch.zeros(1, 64), wq, torch.ones(4, 2, dtype=torch.bfloat16), None, 32)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        K.ext().gemm_q4_i8(torch.zeros(20, 64), wq, torch.ones(4, 2, dtype=torch.float64), None, 32)
