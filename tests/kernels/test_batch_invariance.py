"""Batch invariance of the GEMV kernels: row m of an M-row call equals the 1-row call on row m alone.

Speculative verification runs k+1 rows through the GEMV that plain decoding runs one row at a time, so
greedy identity needs it. The int8-activation kernels (gemv_i8_impl.h: the same accumulator chains for
every M) are bit for bit invariant on every instruction set; the fp32-activation int4 kernel is not (it
applies the group scale to the weights from 3 rows up, gemv_q4.cpp), and is held to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K
from leanformer.compress import double_quant as DQ

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")

ROWS = list(range(1, 17)) + [19]  # 9..16: one call in two halves, tile by tile; 19: 16 rows then 3


def _each_row_alone(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[m : m + 1]) for m in range(x.shape[0])])


def _q4(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    zeros = torch.randn(n, k // group, generator=gen) * 0.01
    return wq, scales, zeros


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("variant", ["asym", "sym", "dq8"])  # zeros / GGUF Q4_0 (none) / 8-bit codes
# 1000: codes padded to 1024, a last half chunk at group 32; 576 / 1088: spans + one 64-column chunk
# (AVX-512 VNNI takes its zero points in the loop; 1088 at group 32: 34 groups, codes looked up there)
@pytest.mark.parametrize("k", [576, 1000, 1088])
def test_q4_i8_rows_equal_one_row_calls(act_isa, group, variant, k):  # noqa: F811
    kp = -(-k // group) * group
    wq, scales, zeros = _q4(77, kp, group)
    lut = None
    if variant == "dq8":
        sc, zc, ranges = DQ.encode(scales, zeros)
        scales, zeros, lut = sc, zc, DQ.lut(ranges)
    elif variant == "sym":
        zeros = None
    bias = torch.randn(77)
    x = torch.randn(max(ROWS), k)

    def fn(rows):
        return K.ext().linear_q4_i8(rows, wq, scales, zeros, group, bias, lut)

    alone = _each_row_alone(fn, x)
    for m in ROWS:
        assert torch.equal(fn(x[:m]), alone[:m]), m


@pytest.mark.parametrize("group", [0, 32, 64])  # 0: one scale per row
@pytest.mark.parametrize("k", [576, 100, 800])  # 100: a partial last block; 800: 3 spans + 32 (q8_span_rows)
def test_q8_i8_rows_equal_one_row_calls(act_isa, group, k):  # noqa: F811
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-128, 128, (53, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(53, -(-k // group), generator=gen) if group else torch.rand(53, generator=gen)
    x = torch.randn(max(ROWS), k)

    def fn(rows):
        return K.ext().linear_q8_i8(rows, w, scales, None, group)

    alone = _each_row_alone(fn, x)
    for m in ROWS:
        assert torch.equal(fn(x[:m]), alone[:m]), m


def test_q8_group16_i8_rows_equal_one_row_calls(act_isa):  # noqa: F811
    """GGUF Q6_K as Int8Linear group 16: two scales per 32-column block."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-128, 128, (53, 576), dtype=torch.int8, generator=gen)
    scales = torch.rand(53, 576 // 16, generator=gen)
    x = torch.randn(max(ROWS), 576)

    def fn(rows):
        return K.ext().linear_q8_i8(rows, w, scales, None, 16)

    alone = _each_row_alone(fn, x)
    for m in ROWS:
        assert torch.equal(fn(x[:m]), alone[:m]), m


@pytest.mark.parametrize("k", [576, 96])  # 96: a last half chunk
def test_q5_i8_rows_equal_one_row_calls(act_isa, k):  # noqa: F811
    """GGUF Q5_0 as Int5Linear (compress/int5.py)."""
    from leanformer.compress.int5 import Int5Linear

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (41, k), dtype=torch.uint8, generator=gen)
    m5 = Int5Linear.from_codes(
        codes, torch.rand(41, k // 32, generator=gen) - 0.5, torch.randn(41, generator=gen)
    )
    x = torch.randn(max(ROWS), k)

    def fn(rows):
        return K.ext().linear_q5_i8(rows, m5.qweight, m5.qhigh, m5.scales, m5.bias)

    alone = _each_row_alone(fn, x)
    for m in ROWS:
        assert torch.equal(fn(x[:m]), alone[:m]), m


@pytest.mark.parametrize("group", [32, 64])
def test_q4_fp32_rows_equal_one_row_calls_to_rounding(isa, group):  # noqa: F811
    wq, scales, zeros = _q4(77, 576, group)
    x = torch.randn(max(ROWS), 576)

    def fn(rows):
        return K.ext().linear_q4(rows, wq, scales, zeros, group, None)

    alone = _each_row_alone(fn, x)
    ref = x.double() @ K.dequant_int4(wq, scales, zeros, group, 576).double().T
    scale = x.abs().double() @ K.dequant_int4(wq, scales, zeros, group, 576).abs().double().T
    for m in ROWS:
        assert float(((fn(x[:m]) - alone[:m]).abs() / (scale[:m] + 1)).max()) < 1e-6
    assert float(((alone - ref).abs() / (scale + 1)).max()) < 1e-6
