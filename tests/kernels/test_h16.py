"""fp16 matmuls on AVX512-FP16 (kernels/gemm_h16.cpp, kernels/h16.py): the product of x and w rounded to fp16
within the error of fp16 chains of 128 terms, bias / GELU / residual applied as the fp32 ops would, every
row and column remainder of the 6 x 64 register tile, and the fp32 fallback where fp16 could overflow."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels as K
from leanformer.kernels.h16 import H16Linear, h16_linears_, native_f16

needs_f16 = pytest.mark.skipif(
    not native_f16(), reason="this CPU lacks AVX512-FP16 (or the kernels are not built)"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T + b on the fp16-rounded operands, in float64 (what the kernel approximates)."""
    y = x.half().double() @ w.half().double().T
    return (y if b is None else y + b.double()).float()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@needs_f16
@pytest.mark.parametrize(
    "m,k,n", [(1, 1, 1), (5, 7, 3), (6, 64, 64), (7, 130, 65), (13, 33, 70), (96, 384, 128), (200, 1536, 384)]
)
def test_linear_h16_matches_fp16_rounded_product(m, k, n):
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    y = K.ext().linear_h16(x, K.ext().pack_h16(w), n, float(w.abs().max()), b)
    want = _reference(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # fp16 chains of <= 64 products per lane: ~1e-3 relative at most (measured ~8e-4 at K = 384)
    assert _rel(y, want) < 2e-3
    # the fp32 result of the unrounded operands is as close: fp16 inputs cost ~4e-4
    assert _rel(y, F.linear(x, w, b)) < 3e-3


@needs_f16
@pytest.mark.parametrize("gelu,residual", [(True, False), (False, True), (True, True)])
def test_linear_h16_epilogue_is_the_fp32_ops(gelu, residual):
    m, k, n = 37, 96, 150
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    r = torch.randn(m, n) if residual else None
    p, wmax = K.ext().pack_h16(w), float(w.abs().max())
    plain = K.ext().linear_h16(x, p, n, wmax, b)
    want = F.gelu(plain) if gelu else plain
    want = want + r if residual else want
    got = K.ext().linear_h16(x, p, n, wmax, b, gelu, r)
    assert (got - want).abs().max() < 1e-5


@needs_f16
def test_linear_h16_declines_what_fp16_cannot_hold():
    w = torch.randn(5, 8)
    p, wmax = K.ext().pack_h16(w), float(w.abs().max())
    assert K.ext().linear_h16(torch.randn(4, 8), p, 5, wmax) is not None
    big = torch.randn(4, 8) * 1e4  # a chain of 64 such products could pass fp16's 65504
    assert K.ext().linear_h16(big, p, 5, wmax) is None
    nan = torch.randn(4, 8)
    nan[1, 3] = float("nan")
    assert K.ext().linear_h16(nan, p, 5, wmax) is None
    inf = torch.randn(4, 17)
    inf[2, 16] = float("inf")  # in the scalar tail of the conversion
    assert K.ext().linear_h16(inf, K.ext().pack_h16(torch.randn(5, 17)), 5, 1.0) is None


@needs_f16
def test_h16_linear_module_falls_back_to_fp32():
    lin = nn.Linear(48, 80)
    h = H16Linear.from_linear(lin)
    x = torch.randn(3, 4, 48)
    with torch.inference_mode():
        assert _rel(h(x), lin(x)) < 3e-3
        big = x * 1e5  # overflow guard: the fp32 matmul, exactly
        assert torch.equal(h(big), lin(big))
        res = torch.randn(3, 4, 80)
        assert _rel(h.fused(big, gelu=True, residual=res), res + F.gelu(lin(big))) < 1e-6
    y = h(x.requires_grad_())  # autograd: the fp32 Linear
    y.sum().backward()
    assert x.grad is not None and torch.equal(y, lin(x))
    assert set(h.state_dict()) == {"weight", "bias"} and h.weight.dtype == torch.float32
    twin = copy.deepcopy(h)
    with torch.inference_mode():
        assert torch.equal(twin(x.detach()), h(x.detach()))


@needs_f16
def test_h16_linears_swaps_plain_fp32_linears_only():
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 0, device="meta").to_empty(device="cpu"), nn.Linear(8, 4))
    )
    model.probe = nn.Linear(4, 2)
    h16_linears_(model)
    assert type(model[0]) is H16Linear and type(model[1][1]) is H16Linear
    assert type(model[1][0]) is nn.Linear and type(model.probe) is nn.Linear  # empty; the probe


@needs_f16
def test_fp16_output_feeds_the_next_matmul_unchanged():
    """linear_h16_to_h16 (the FFN's GELU output kept fp16): without GELU the fp32 path's values rounded to
    fp16; with it GELU in fp16 arithmetic (gelu32h) on them: 1-2 fp16 ulps for |x| <~ 1, up to ~5e-3
    relative in the negative tail where |y| ~ 0.03-0.05 (10.5 ulps measured) and <= 2.2e-4 absolute below;
    its max |value| exact; the next call on it equal to the call on those values given in fp32."""
    m, k, n, n2 = 50, 96, 130, 24
    x, w, b, w2 = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n), torch.randn(n2, n) / n**0.5
    p, wmax = K.ext().pack_h16(w), float(w.abs().max())
    plain32, plain16 = K.ext().linear_h16(x, p, n, wmax, b), K.ext().linear_h16_to_h16(x, p, n, wmax, b)[0]
    assert torch.equal(plain16, plain32.half())
    y32 = F.gelu(plain32.half().double())  # what the fp16 GELU approximates
    y16, amax = K.ext().linear_h16_to_h16(x, p, n, wmax, b, True)
    assert y16.dtype == torch.float16
    assert torch.all((y16.double() - y32).abs() <= 6e-3 * y32.abs() + 3e-4)
    assert amax == float(y16.abs().max())
    p2, wmax2 = K.ext().pack_h16(w2), float(w2.abs().max())
    from_h16 = K.ext().linear_h16(y16, p2, n2, wmax2, x_absmax=amax)
    assert torch.equal(from_h16, K.ext().linear_h16(y16.float(), p2, n2, wmax2))
    assert torch.equal(K.ext().linear_h16(y16, p2, n2, wmax2), from_h16)  # absmax measured when not given
    with pytest.raises(RuntimeError, match="K even"):
        K.ext().linear_h16(torch.randn(3, 5).half(), K.ext().pack_h16(torch.randn(4, 5)), 4, 1.0)


@needs_f16
def test_h16_linear_chain_through_fp16():
    a, b = H16Linear.from_linear(nn.Linear(40, 64)), H16Linear.from_linear(nn.Linear(64, 16))
    x = torch.randn(2, 5, 40)
    with torch.inference_mode():
        mid = a.to_h16(x, gelu=True)
        y = b.fused(mid)
        assert y.shape == (2, 5, 16)
        assert torch.equal(y, b.fused(mid.data.float().view(2, 5, 64)))  # the fp16 values, as they are
        ref = F.linear(F.gelu(F.linear(x, a.weight, a.bias)), b.weight, b.bias)
        assert _rel(y, ref) < 3e-3
        huge = a.to_h16(x * 1e6, gelu=True)  # fp16 cannot hold it: the fp32 result instead
        assert huge.dtype == torch.float32 and torch.equal(huge, F.gelu(F.linear(x * 1e6, a.weight, a.bias)))


@needs_f16
@pytest.mark.parametrize("m,n", [(1, 64), (5, 130), (25, 64), (100, 384), (400, 192)])
@pytest.mark.parametrize("scaled", [True, False])
def test_linear_h16_norm_is_linear_then_layer_norm(m, n, scaled):
    """linear_h16_norm (the post-LayerNorm blocks' output projections): the same bits as linear_h16 with the
    residual and then layer_norm_, for every row count the task split makes (whole rows per task, 6-24
    rows), with its fp16 copy equal to those values rounded and the copy's max |value| exact."""
    k = 96
    x, w, b, res = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n), torch.randn(m, n)
    lw, lb = (torch.rand(n) + 0.5, torch.randn(n)) if scaled else (None, None)
    p, wmax = K.ext().pack_h16(w), float(w.abs().max())
    want = K.ext().layer_norm_(K.ext().linear_h16(x, p, n, wmax, b, False, res), lw, lb, 1e-12)
    y, y16, amax = K.ext().linear_h16_norm(x, p, n, wmax, b, res, lw, lb, 1e-12)
    assert torch.equal(y, want) and torch.equal(y16, want.half())
    assert amax == float(want.abs().max())
    # fp16 input with its max |x| given, no residual: as the fp32 input of the same values
    y2 = K.ext().linear_h16_norm(x.half(), p, n, wmax, b, None, lw, lb, 1e-5, float(x.half().abs().max()))[0]
    assert torch.equal(
        y2, K.ext().layer_norm_(K.ext().linear_h16(x.half().float(), p, n, wmax, b), lw, lb, 1e-5)
    )


@needs_f16
def test_linear_h16_norm_declines_and_flags():
    x, w = torch.randn(8, 32), torch.randn(64, 32)
    p = K.ext().pack_h16(w)
    assert K.ext().linear_h16_norm(x * 1e4, p, 64, float(w.abs().max())) is None  # a chain could overflow
    res = torch.randn(8, 64)
    res[3, 5] = float("nan")
    y, y16, amax = K.ext().linear_h16_norm(x, p, 64, float(w.abs().max()), residual=res)
    assert amax == float("inf") and y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any()
    with pytest.raises(RuntimeError, match="even number of outputs"):
        K.ext().linear_h16_norm(x, K.ext().pack_h16(torch.randn(63, 32)), 63, 1.0)
    with pytest.raises(RuntimeError, match="ln_w must be"):
        K.ext().linear_h16_norm(x, p, 64, 1.0, ln_w=torch.ones(32))


@needs_f16
def test_h16_linear_fused_norm_module():
    """H16Linear.fused_norm: LayerNorm(residual + linear(x)) and its fp16 copy in one call, equal to fused
    then the LayerNorm; None where it may not run (not a plain LayerNorm over the outputs, hooks,
    autograd), and no copy where fp16 cannot hold the result."""
    lin, norm = H16Linear.from_linear(nn.Linear(48, 64)), nn.LayerNorm(64, eps=1e-12)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    x, res = torch.randn(2, 7, 48), torch.randn(2, 7, 64)
    with torch.inference_mode():
        y, copy16 = lin.fused_norm(x, res, norm)
        assert y.shape == (2, 7, 64) and copy16.shape == (2, 7) and copy16.data.shape == (14, 64)
        assert torch.equal(
            y,
            K.ext()
            .layer_norm_(lin.fused(x, residual=res).view(14, 64), norm.weight, norm.bias, 1e-12)
            .view(2, 7, 64),
        )
        assert torch.equal(copy16.data, y.view(14, 64).half()) and copy16.absmax == float(y.abs().max())
        # the copy feeds the next H16Linear as the fp32 values would
        nxt = H16Linear.from_linear(nn.Linear(64, 32))
        assert torch.equal(nxt.to_h16(copy16).data, nxt.to_h16(copy16.data.float().view(2, 7, 64)).data)
        assert lin.fused_norm(x, res, nn.RMSNorm(64)) is None
        assert lin.fused_norm(x, res, nn.LayerNorm(32)) is None
        hooked = nn.LayerNorm(64)
        hooked.register_forward_hook(lambda *a: None)
        assert lin.fused_norm(x, res, hooked) is None
        assert lin.fused_norm(x, res * 1e5, norm)[1] is not None  # LayerNorm brings it back into range
        big = nn.LayerNorm(64)
        with torch.no_grad():
            big.weight.fill_(1e5)
        out, none = lin.fused_norm(x, res, big)
        assert none is None and out.abs().max() > 60000
    assert lin.fused_norm(x, res, norm) is None  # autograd on


@needs_f16
@pytest.mark.parametrize("gelu", [False, True])
def test_fp16_output_max_sees_a_nan_anywhere(gelu):
    """The fp16 output's max |value| is NaN when any written value is NaN, wherever it falls (the maxima
    are kept per vector and merged at the end), so callers never take NaNs for a finite fp16 result."""
    x, w = torch.randn(30, 64), torch.randn(200, 64) / 8
    p, wmax = K.ext().pack_h16(w), float(w.abs().max())
    for col in (0, 17, 63, 64, 130, 199):
        b = torch.zeros(200)
        b[col] = float("nan")
        y, amax = K.ext().linear_h16_to_h16(x, p, 200, wmax, b, gelu)
        assert y[:, col].isnan().all() and amax != amax  # NaN
    y, amax = K.ext().linear_h16_to_h16(x, p, 200, wmax, torch.zeros(200), gelu)
    assert (
        amax == float(y.float().abs().max())
        if gelu
        else amax == float(K.ext().linear_h16(x, p, 200, wmax).abs().max())
    )
