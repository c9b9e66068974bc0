"""The int8-activation GEMV kernels (kernels/gemv_i8.cpp) against the float64 reference of the same
quantized math (kernels/int8_act.py), on every instruction set this CPU offers (AVX2 maddubs always;
AVX-VNNI and AVX-512 VNNI where present, skipped with the reason elsewhere). Integer accumulation is
exact, so only fp32 summation order separates them: tolerance 1e-5 of the sum of |terms|."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K
from leanformer.kernels import cpu
from leanformer.kernels.int8_act import (
    ref_dequantize_act,
    ref_linear_q4_i8,
    ref_linear_q8_i8,
    ref_quantize_act,
)

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """|y - ref| <= 1e-5 * (sum_k |x_k w_k| + 1): fp32 rounding of the per-block partial sums only."""
    assert y.shape == ref.shape
    err = float(((y.double() - ref).abs() / (scale + 1)).max())
    assert err < 1e-5, err


@pytest.mark.parametrize("k", [576, 100, 31, 1, 64, 1000])
def test_quantize_act_is_bit_exact(k):
    x = torch.randn(5, k) * torch.logspace(-3, 3, k)  # blocks of very different ranges
    x[1] = 0  # all-zero blocks: scale 0, codes 0
    q, d = K.ext().quantize_act(x)
    rq, rd = ref_quantize_act(x)
    assert torch.equal(q, rq) and torch.equal(d, rd)
    assert q.abs().max() <= 127 and q.shape[1] % 32 == 0


@pytest.mark.parametrize("rows", [1, 3, 11, 19])  # 11: two halves of one call; 19: calls of 16 and 3
@pytest.mark.parametrize(
    ("group", "k"),
    [
        (32, 576),
        (32, 96),
        (32, 1000),
        (32, 1568),
        (64, 576),
        (64, 100),
        (96, 288),
        (160, 480),
        (128, 256),
        (256, 512),
        (192, 768),
    ],
)  # 96 / 160: groups that end mid 64-column chunk; 1000: a partial last block; 192: a group boundary
#    inside a 128-column superchunk of the AVX-512 loops (gemv_i8_wide.h); 1568: three 512-column spans
#    (span_rows) then a last 32 columns
@pytest.mark.parametrize("symmetric", [False, True])  # True: zeros=None, w = (code - 8) * scale
def test_q4(act_isa, rows, group, k, symmetric):
    kp = -(-k // group) * group  # codes padded to whole groups; x stays k wide (the fused step's k_padded)
    n = 67
    wq = K.pack_int4(torch.randint(0, 16, (n, kp), dtype=torch.uint8))
    scales, zeros, bias = torch.rand(n, kp // group) + 0.05, torch.randn(n, kp // group), torch.randn(n)
    x = torch.randn(rows, k) * 3
    if symmetric:
        zeros = torch.zeros_like(scales)
        y = K.ext().linear_q4_i8(x, wq, scales, None, group, bias)
        assert torch.equal(y, K.ext().linear_q4_i8(x, wq, scales, zeros, group, bias))
    else:
        y = K.ext().linear_q4_i8(x, wq, scales, zeros, group, bias)
    ref = ref_linear_q4_i8(x, wq, scales, zeros, group, bias)
    w = K.dequant_int4(wq, scales, zeros, group, kp).double()
    close(y, ref, torch.nn.functional.pad(ref_dequantize_act(x), (0, kp - k)).abs() @ w.abs().T)


@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("k", [576, 1536, 640, 1568, 96])  # spans + an odd chunk; spans only; a span + a
#   128-column superchunk; spans + a last 32 columns; no span (the superchunk loop and the odd chunk only)
# zeros: none (GGUF Q4_0), fp32 ones fp16 cannot hold (read as fp32), fp16 values (GGUF Q4_1's mins: read
# from their fp16 copy too, in the spans and the odd chunk after them; nib_finish past that)
@pytest.mark.parametrize("zeros_kind", ["none", "fp32", "fp16"])
def test_q4_half_scales_equal_fp32(act_isa, rows, k, zeros_kind):
    """Scales (and zero points) that fp16 holds exactly (a GGUF's) read from an fp16 copy by the 512-bit
    group-32 loops (what the fused step does: DecodeLinear) give the fp32 arrays' results bit for bit;
    other ISAs ignore the copy. Scales fp16 cannot hold are refused."""
    n = 37  # rows past a multiple of 8 / 16
    wq = K.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    scales = (torch.rand(n, k // 32) * 0.02 + 1e-3).half().float()
    zeros = None if zeros_kind == "none" else torch.randn(n, k // 32) * 0.01
    if zeros_kind == "fp16":
        zeros = zeros.half().float()
    x = torch.randn(rows, k) * 3
    e = K.ext()
    y32 = e.linear_q4_i8(x, wq, scales, zeros, 32)
    assert torch.equal(e.linear_q4_i8(x, wq, scales, zeros, 32, half_scales=True), y32)
    with pytest.raises(RuntimeError, match="float16 holds exactly"):
        e.linear_q4_i8(x, wq, scales + 1e-7, zeros, 32, half_scales=True)


@pytest.mark.parametrize("rows", [1, 2, 9, 17])  # 17: calls of 16 and 1
@pytest.mark.parametrize(
    ("group", "k"),
    [(0, 576), (0, 100), (0, 7), (32, 576), (32, 100), (64, 192), (32, 256), (32, 64), (32, 800), (32, 1120)],
)  # group 32 from 32-column multiples: AVX-512 VNNI's 256-column spans (gemv_i8_wide.h q8_span_rows):
#    exactly one (256), a part of one (64), whole ones then 32 (800) or 96 (1120) columns
def test_q8(act_isa, rows, group, k):
    n = 45
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    wq[0] = -128  # |w| = 128 takes the sign trick's edge case
    scales = torch.rand(n) if group == 0 else torch.rand(n, -(-k // group))
    x = torch.randn(rows, k)
    y = K.ext().linear_q8_i8(x, wq, scales, None, group)
    ref = ref_linear_q8_i8(x, wq, scales, None, group)
    close(y, ref, ref_dequantize_act(x).abs() @ K.dequant_int8(wq, scales, group or None).double().abs().T)


@pytest.mark.parametrize("rows", [1, 2, 9, 17])
@pytest.mark.parametrize("k", [576, 256, 64, 800, 1120, 1536])  # the span cases of test_q8
def test_q8_half_scales_equal_fp32(act_isa, rows, k):
    """Group-32 scales that fp16 holds exactly (a GGUF's Q8_0 blocks) read from an fp16 copy by the
    512-bit span loop (what the fused step does: DecodeLinear) give the fp32 arrays' results bit for bit;
    other ISAs ignore the copy. Scales fp16 cannot hold, and other groups, are refused."""
    n = 45
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = (torch.rand(n, k // 32) * 0.02 + 1e-3).half().float()
    x, bias = torch.randn(rows, k) * 3, torch.randn(n)
    e = K.ext()
    y32 = e.linear_q8_i8(x, wq, scales, bias, 32)
    assert torch.equal(e.linear_q8_i8(x, wq, scales, bias, 32, half_scales=True), y32)
    with pytest.raises(RuntimeError, match="float16 holds exactly"):
        e.linear_q8_i8(x, wq, scales + 1e-7, bias, 32, half_scales=True)
    with pytest.raises(RuntimeError, match="float16 holds exactly"):
        e.linear_q8_i8(x, wq, scales[:, 0].contiguous(), bias, 0, half_scales=True)


def test_close_to_fp32_activations():
    """The int8 activations cost little: relative error vs the fp32-activation kernel ~1%."""
    x, wq = torch.randn(4, 576), K.pack_int4(torch.randint(0, 16, (300, 576), dtype=torch.uint8))
    s, z = torch.rand(300, 9) * 0.02, torch.randn(300, 9) * 0.01
    y8, y32 = K.ext().linear_q4_i8(x, wq, s, z, 64), K.ext().linear_q4(x, wq, s, z, 64)
    assert float((y8 - y32).norm() / y32.norm()) < 0.02


def test_rejects_what_it_cannot_run():
    x = torch.randn(1, 96)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        K.ext().linear_q8_i8(x, torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 2), None, 48)
    with pytest.raises(RuntimeError, match="group_size"):
        K.ext().linear_q4_i8(torch.randn(1, 130), torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 4),
                             torch.ones(4, 4), 32)  # fmt: skip
    with pytest.raises(ValueError, match="unavailable"):
        cpu.set_act_isa("sse2")


def test_describe_names_cpu_and_paths():
    d = K.describe()
    assert d["cpu"]["flags"]["avx2"] and set(d["cpu"]["flags"]) >= {"avx512_vnni", "avx_vnni", "amx_int8"}
    assert d["paths"]["linear int8 / int4, int8 activations (decode)"] == cpu.act_isa()
    assert d["threads"] >= 1 and d["recommended_threads"] >= 1
    assert K.cpu_info()["model"] in cpu.summary()


def test_physical_cores_counts_smt_siblings_once(monkeypatch):
    text = "".join(
        f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4)
    )  # 4 logical CPUs on 2 cores
    monkeypatch.setattr(cpu, "_usable_cpus", lambda: {0, 1, 2, 3})
    assert cpu.physical_cores(text) == 2
    monkeypatch.setattr(cpu, "_usable_cpus", lambda: {0})
    assert cpu.physical_cores(text) == 1
