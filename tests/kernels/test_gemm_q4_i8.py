"""The int8-activation int4 prefill GEMM (kernels/gemm_q4_i8.cpp) against the float64 reference of the
same quantized math (kernels/int8_act.py ref_linear_q4_i8), on every instruction set this CPU offers;
a row's result alone equals its result among many; Int4Linear's prefill takes it under "auto" / "int8"
and the dequantized-weight path under "fp32"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer import kernels as K
from leanformer.compress import Int4Linear
from leanformer.compress.qbase import set_prefill_activations
from leanformer.errors import LeanformerError
from leanformer.kernels import cpu, dequant_int4
from leanformer.kernels.int8_act import ref_linear_q4_i8, ref_linear_q8_i8

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def operands(n: int, kp: int, group: int, zeros: bool):
    w = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8)
    s = torch.rand(n, kp // group) * 0.1 + 0.01
    z = torch.randn(n, kp // group) * 0.01 if zeros else None
    return w, s, z


@pytest.mark.parametrize(
    ("rows", "k", "n", "group", "zeros"),
    [
        (17, 576, 96, 32, False),  # SmolLM2's K, one full tile and one row
        (40, 1536, 70, 32, True),  # tiles of 16 / 8 and a partial one; zero points; n not a multiple of 6
        (128, 576, 33, 64, True),  # group 64
        (33, 100, 7, 32, False),  # K short of the codes' 128 columns (zero-padded)
        (5, 256, 13, 128, False),  # fewer rows than a tile
    ],
)
def test_gemm_matches_reference(act_isa, rows, k, n, group, zeros):
    kp = -(-k // group) * group
    w, s, z = operands(n, kp, group, zeros)
    x, b = torch.randn(rows, k) * 3, torch.randn(n)
    y = K.ext().gemm_q4_i8(x, w, s, z, group, b)
    z0 = torch.zeros_like(s) if z is None else z
    ref = ref_linear_q4_i8(x, w, s, z0, group, b)
    # the sum of |terms| of each output: fp32 rounding of the per-block partial sums is relative to it
    scale = F.pad(x.abs().double(), (0, kp - k)) @ dequant_int4(w, s, z0, group, kp).abs().double().T
    err = float(((y.double() - ref).abs() / (scale + 1)).max())
    assert y.shape == (rows, n) and err < 1e-5, err


def test_row_alone_equals_row_in_batch(act_isa):
    w, s, z = operands(50, 576, 32, zeros=True)
    x = torch.randn(37, 576)
    y = K.ext().gemm_q4_i8(x, w, s, z, 32)
    for m in (0, 15, 16, 36):
        assert torch.equal(K.ext().gemm_q4_i8(x[m : m + 1], w, s, z, 32)[0], y[m])


def test_bad_operands_are_refused():
    w, s, _ = operands(8, 64, 32, zeros=False)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        K.ext().gemm_q4_i8(torch.randn(20, 64), w, s, None, 48)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        K.ext().gemm_q4_i8(torch.randn(20, 64), w, s[:, :1], None, 32)


def test_int4_linear_prefill_paths():
    lin = torch.nn.Linear(200, 72)
    q = Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(3, 20, 200)  # 60 rows: past the decode kernels' 16
    model = torch.nn.Sequential(q)
    set_prefill_activations(model, "fp32")
    with torch.inference_mode():
        y_fp32 = model(x)
        set_prefill_activations(model, "int8")
        y_int8 = model(x)
    s, z = q.group_params()
    ref = ref_linear_q4_i8(x.reshape(-1, 200), q.qweight, s, z, 32, lin.bias.detach())
    assert torch.allclose(y_int8.reshape(-1, 72).double(), ref, atol=1e-4)
    rel = (y_int8 - y_fp32).norm() / y_fp32.norm()
    assert 0 < rel < 0.02, rel  # activation rounding: small, and really taken
    assert torch.equal(q.dequantize_as(slice(None), torch.float32), q.dequantize())
    with pytest.raises(LeanformerError, match="prefill activations must be one of"):
        set_prefill_activations(model, "int4")


def test_auto_follows_the_decode_rule():
    q = Int4Linear.from_linear(torch.nn.Linear(64, 16), group_size=32)
    want = cpu.act_isa() in cpu.AUTO_INT8
    assert q.prefill_activations == "auto"
    assert q._int8_prefill(torch.randn(40, 64)) == want
    x = torch.randn(40, 64, requires_grad=True)  # autograd keeps the differentiable path
    assert not q._int8_prefill(x)


@pytest.mark.parametrize(
    ("rows", "k", "n", "group"), [(40, 576, 70, 32), (17, 64, 9, 0), (128, 1536, 33, 64)]
)
def test_int8_weight_gemm(act_isa, rows, k, n, group):
    """The same loops on int8 weights (codes w + 128, offset 128): VNNI only, AVX2 refuses in one line."""
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) if group == 0 else torch.rand(n, k // group)
    x, b = torch.randn(rows, k) * 2, torch.randn(n)
    if act_isa == "avx2":
        with pytest.raises(RuntimeError, match="needs AVX-VNNI or AVX-512 VNNI"):
            K.ext().gemm_q8_i8(x, w, s, group, b)
        return
    y = K.ext().gemm_q8_i8(x, w, s, group, b)
    ref = ref_linear_q8_i8(x, w, s, b, group)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(K.ext().gemm_q8_i8(x[-1:].contiguous(), w, s, group, b)[0], y[-1])
