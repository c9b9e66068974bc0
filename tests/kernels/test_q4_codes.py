"""int4 kernels reading 8-bit scale/zero codes + their fp32 table (kernels/q4_codes.h) instead of fp32
scales/zeros [N, G]: every path (fp32-activation GEMV on each ISA, int8-activation GEMV on each act ISA,
the dequantizer) gives bit for bit what it gives on the decoded
fp32 arrays, since both read the same fp32 values (compress/double_quant.py lut / decode). The fused decode step and the
module: tests/compress/test_int4_codes.py."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K
from leanformer.compress import double_quant as DQ

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")


def _operands(n: int, kp: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    g = kp // group
    scales = torch.exp(torch.rand(n, g, generator=gen) * 4.6 - 2.3) * 1e-2
    zeros = (torch.rand(n, g, generator=gen) * 15 - 7) * scales
    sc, zc, ranges = DQ.encode(scales, zeros)
    wq = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=gen)
    lut = DQ.lut(ranges)
    s, z = DQ.decode(sc, zc, ranges)
    return wq, sc, zc, lut, s.contiguous(), z.contiguous()


# n = 301 rows: several decode chunks (<= 2048 scales each) and a partial one; k = 8192 at group 32:
# 256 groups, 8 rows per chunk; 100 / 1000: padded codes (Kp > K); 800 / 1440 (codes decoded per chunk
# of rows) and 2080 / 3360 / 4160 (>= 32 groups: codes looked up in the int8-activation loops): a last
# half chunk of 32 columns, a group count that is not a multiple of 8, group 96: chunks straddling two
# groups; 1088 at group 32 (>= 32 groups): two 512-column spans and one 64-column chunk, whose zero
# points the AVX-512 VNNI loop takes in place (gemv_i8_wide.h)
SHAPES = [
    (301, 576, 576, 32),
    (301, 576, 576, 64),
    (37, 8192, 8192, 32),
    (45, 100, 128, 32),
    (45, 1000, 1024, 128),
    (13, 800, 800, 32),
    (13, 1440, 1440, 96),
    (13, 2080, 2080, 32),
    (13, 3360, 3360, 96),
    (13, 4160, 4160, 64),
    (13, 1088, 1088, 32),
]


@pytest.mark.parametrize("n,k,kp,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_q4_codes_equal_fp32_arrays(isa, n, k, kp, group, rows):  # noqa: F811
    wq, sc, zc, lut, s, z = _operands(n, kp, group)
    x = torch.randn(rows, kp)
    bias = torch.randn(n)
    e = K.ext()
    assert torch.equal(e.linear_q4(x, wq, sc, zc, group, bias, lut), e.linear_q4(x, wq, s, z, group, bias))


@pytest.mark.parametrize("n,k,kp,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 11])
def test_linear_q4_i8_codes_equal_fp32_arrays(act_isa, n, k, kp, group, rows):  # noqa: F811
    wq, sc, zc, lut, s, z = _operands(n, kp, group)
    x = torch.randn(rows, k)
    e = K.ext()
    assert torch.equal(
        e.linear_q4_i8(x, wq, sc, zc, group, None, lut), e.linear_q4_i8(x, wq, s, z, group, None)
    )


@pytest.mark.parametrize("n,k,kp,group", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_q4_codes_equal_fp32_arrays(n, k, kp, group, bf16):
    wq, sc, zc, lut, s, z = _operands(n, kp, group)
    e = K.ext()
    s, z = s[:, : -(-k // group)], z[:, : -(-k // group)]
    sc, zc = sc[:, : s.shape[1]], zc[:, : s.shape[1]]
    assert torch.equal(e.dequant_q4(wq, sc, zc, group, k, bf16, lut), e.dequant_q4(wq, s, z, group, k, bf16))


def test_lut_matches_the_decode_formula():
    """The table holds the fp32 values of double_quant's decode formula, code by code."""
    ranges = torch.tensor([-6.1, 4.3, -7.2, 15.1])
    table = DQ.lut(ranges)
    lo, span, zlo, zspan = (float(v) for v in ranges)
    for c in (0, 1, 77, 254, 255):
        cf = torch.tensor([float(c)])
        assert torch.equal(table[c : c + 1], torch.exp(lo + cf * (span / 255)))
        assert torch.equal(table[256 + c : 257 + c], zlo + cf * (zspan / 255))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), None), "lut"),
        ((torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(4, 2), torch.zeros(512)), "both"),
        (
            (torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(500)),
            "512",
        ),
        ((torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(512)), "lut goes with"),
    ],
)
def test_bad_scale_operands_are_refused(args, match):
    s, z, lut = args
    with pytest.raises(RuntimeError, match=match):
        K.ext().linear_q4(torch.zeros(1, 64), torch.zeros(4, 32, dtype=torch.uint8), s, z, 32, None, lut)
