"""The int8 row passes around Int8DynamicLinear's oneDNN GEMM (kernels/int8_rows.cpp) compute what the
torch ops they replace do: quantization bit for bit, the rescale / bias / residual epilogue bit for bit
and GELU to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer import kernels as K

needs_kernels = pytest.mark.skipif(not K.available(), reason="kernels unavailable on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == want.shape
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= tol, err


@needs_kernels
@pytest.mark.parametrize("m,k", [(1, 5), (7, 384), (300, 1536), (5, 33)])
def test_quantize_rows_u8_is_bit_exact(m, k):
    from leanformer.compress import kernels as CK

    x = torch.randn(m, k) * 3
    x[0] = 0  # an all-zero row: the 1e-8 floor on the scale
    q, s = K.ext().quantize_rows_u8(x)
    q2, s2 = CK.quantize_rows_int8(x, shift=128)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@needs_kernels
@pytest.mark.parametrize("m,n", [(3, 5), (33, 384), (100, 1536)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_epilogue(m, n, gelu, with_residual, with_bias):
    y, s = torch.randn(m, n) * 50, torch.rand(m, 1) * 0.1
    b, r = torch.randn(n) if with_bias else None, torch.randn(m, n) if with_residual else None
    want = y * s if b is None else y * s + b
    want = F.gelu(want) if gelu else want
    want = want if r is None else r + want
    got = K.ext().int8_epilogue_(y, s, b, gelu, r)
    assert got.data_ptr() == y.data_ptr()  # in place
    if gelu:
        _close(got, want, 1e-6)  # erf: same approximation as torch's, exp differs in the last bit
    else:
        assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_int8_dynamic_linear_epilogue_matches_torch_path(gelu, with_residual):
    from leanformer.compress import Int8DynamicLinear
    from leanformer.compress import kernels as CK

    if not CK.cpu_has_vnni():
        pytest.skip("the oneDNN int8 path needs VNNI here")
    lin = torch.nn.Linear(64, 96)
    q = Int8DynamicLinear.from_linear(lin, min_tokens=4).eval()
    x = torch.randn(2, 20, 64)
    r = torch.randn(2, 20, 96) if with_residual else None
    with torch.inference_mode():
        got = q.forward_epilogue(x, gelu, r)
        want = q._forward(x)
        want = F.gelu(want) if gelu else want
        want = want if r is None else r + want
        assert got.shape == want.shape == (2, 20, 96)
        _close(got, want, 1e-6)
        _close(q(x), q._forward(x), 0)  # plain forward: the fused passes are bit-exact without GELU
