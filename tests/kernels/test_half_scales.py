"""int4 and int8 kernels reading scales (and int4 zero points) held as fp16 (kernels/q4_codes.h, common.h
Q8I8; an Int4Linear / Int8Linear holds a GGUF's fp16 block scales so: QuantLinear.compact_scales) instead of
fp32 arrays: every path (the int8-activation GEMV on each act ISA, at group 32 reading fp16 in its loops
and for int4 at other groups through the per-chunk decode; the fp32-activation GEMV on each ISA; the
dequantizer; the prefill GEMM) gives bit for bit what it gives on the fp32 arrays of the same values. The
fused step and the modules: tests/compress/test_half_scales.py."""

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


# 16448 at group 32: 514 groups, past what a row widens up front at 2+ rows (kHalfWiden): converted in place
@pytest.mark.parametrize("n,kp,group", [*SHAPES, (5, 16448, 32)])
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


# 8448 at group 32: 264 groups, past what a GEMM row widens up front (kHalfWiden): widened per call
@pytest.mark.parametrize("n,kp,group", [*SHAPES, (5, 8448, 32)])
@pytest.mark.parametrize("hold", HOLDS)
def test_gemm_q4_i8_half_equals_fp32_arrays(act_isa, n, kp, group, hold):  # noqa: F811
    wq, s, z, hs, hz = _operands(n, kp, group, hold)
    x = torch.randn(40, kp)
    e = K.ext()
    assert torch.equal(e.gemm_q4_i8(x, wq, hs, hz, group), e.gemm_q4_i8(x, wq, s, z, group))


def test_other_dtypes_are_refused():  # int4
    wq = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        K.ext().linear_q4_i8(torch.zeros(1, 64), wq, torch.ones(4, 2, dtype=torch.bfloat16), None, 32)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        K.ext().gemm_q4_i8(torch.zeros(20, 64), wq, torch.ones(4, 2, dtype=torch.float64), None, 32)


# int8 (GGUF Q8_0: group 32, K a multiple of 32): 576 / 1536 = whole 256-column spans (+ 64 columns), 96
Q8_SHAPES = [(301, 576), (19, 1536), (45, 96)]


def _q8_operands(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    return wq, s


@pytest.mark.parametrize("n,k", [*Q8_SHAPES, (5, 16448)])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 19])
def test_linear_q8_i8_half_equals_fp32_arrays(act_isa, n, k, rows):  # noqa: F811
    wq, s = _q8_operands(n, k)
    x, bias = torch.randn(rows, k), torch.randn(n)
    e = K.ext()
    assert torch.equal(e.linear_q8_i8(x, wq, s.half(), bias, 32), e.linear_q8_i8(x, wq, s, bias, 32))


@pytest.mark.parametrize("n,k", Q8_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_q8_half_equals_fp32_arrays(isa, n, k, rows):  # noqa: F811
    wq, s = _q8_operands(n, k)
    x = torch.randn(rows, k)
    e = K.ext()
    assert torch.equal(e.linear_q8(x, wq, s.half(), None, 32), e.linear_q8(x, wq, s, None, 32))


@pytest.mark.parametrize("n,k", Q8_SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_q8_half_equals_fp32_arrays(n, k, bf16):
    wq, s = _q8_operands(n, k)
    e = K.ext()
    assert torch.equal(e.dequant_q8(wq, s.half(), 32, bf16), e.dequant_q8(wq, s, 32, bf16))


@pytest.mark.parametrize("n,k", [*Q8_SHAPES, (5, 8448)])
def test_gemm_q8_i8_half_equals_fp32_arrays(act_isa, n, k):  # noqa: F811
    if act_isa == "avx2":
        pytest.skip("the int8-weight GEMM needs VNNI")
    wq, s = _q8_operands(n, k)
    x = torch.randn(40, k)
    e = K.ext()
    assert torch.equal(e.gemm_q8_i8(x, wq, s.half(), 32), e.gemm_q8_i8(x, wq, s, 32))


def test_q8_half_scales_need_group_32():
    wq, s = _q8_operands(4, 128)
    with pytest.raises(RuntimeError, match="float16 int8 scales need groups of 32"):
        K.ext().linear_q8_i8(torch.zeros(1, 128), wq, s.half()[:, :2].contiguous(), None, 64)


# int5 (GGUF Q5_0: group 32): 576 = 9 chunks, 608 a last 32 columns
@pytest.mark.parametrize("n,k", [(301, 576), (23, 608)])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 19])
def test_linear_q5_i8_half_equals_fp32_arrays(act_isa, n, k, rows):  # noqa: F811
    from leanformer.compress.int5 import pack_codes

    gen = torch.Generator().manual_seed(0)
    qweight, qhigh = pack_codes(torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen))
    s = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    x, bias = torch.randn(rows, k - 5), torch.randn(n)
    e = K.ext()
    assert torch.equal(
        e.linear_q5_i8(x, qweight, qhigh, s.half(), bias), e.linear_q5_i8(x, qweight, qhigh, s, bias)
    )
    assert torch.equal(e.dequant_q5(qweight, qhigh, s.half()), e.dequant_q5(qweight, qhigh, s))
