"""kernels/layer_norm.cpp: in-place LayerNorm (residual add optionally fused) computes what
F.layer_norm(x + residual) does, to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer import kernels as K

needs_kernels = pytest.mark.skipif(not K.available(), reason="kernels unavailable on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@needs_kernels
@pytest.mark.parametrize("m,k", [(1, 5), (7, 384), (300, 1536), (5, 33), (3, 8)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_matches_torch(m, k, residual, affine):
    x = torch.randn(m, k) * 3 + 1
    r = torch.randn(m, k) if residual else None
    w, b = (torch.randn(k), torch.randn(k)) if affine else (None, None)
    want = F.layer_norm(x + r if residual else x, (k,), w, b, 1e-12)
    y = x.clone()
    got = K.ext().layer_norm_(y, w, b, 1e-12, r)
    assert got.data_ptr() == y.data_ptr()  # in place
    assert (got - want).abs().max().item() < 1e-5


@needs_kernels
def test_layer_norm_constant_rows_and_errors():
    x = torch.full((4, 64), 2.5)  # zero variance: eps keeps it finite, output = bias
    b = torch.randn(64)
    assert torch.allclose(K.ext().layer_norm_(x, None, b, 1e-5), b.expand(4, 64))
    with pytest.raises(RuntimeError, match="contiguous"):
        K.ext().layer_norm_(torch.randn(8, 6).t())
    with pytest.raises(RuntimeError, match="residual"):
        K.ext().layer_norm_(torch.randn(4, 8), residual=torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="w must be"):
        K.ext().layer_norm_(torch.randn(4, 8), torch.randn(7))
