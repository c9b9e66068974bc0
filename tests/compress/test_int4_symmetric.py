"""Int4Linear(symmetric=True) (GGUF Q4_0): no zeros buffer, and every path gives what the same codes and
scales give with all-zero zero points."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from leanformer import kernels
from leanformer.compress import Int4Linear, qbase
from leanformer.compress.kernels import int4_codes, int4_params

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")


def _pair(n: int = 72, k: int = 576, seed: int = 0) -> tuple[Int4Linear, Int4Linear]:
    """(symmetric, asymmetric with zeros all 0) modules with the same codes and scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    scales, _ = int4_params(w, 32)
    zeros = torch.zeros_like(scales)
    codes = int4_codes(w, scales, zeros, 32)
    sym = Int4Linear(k, n, 32, symmetric=True)
    asym = Int4Linear.from_linear(nn.Linear(k, n, bias=False), 32, codes, scales, zeros)
    sym.scales.copy_(scales)
    sym.set_codes(codes)
    return sym, asym


def test_holds_no_zeros():
    sym, asym = _pair()
    assert sym.zeros is None and "zeros" not in sym.state_dict()
    assert "symmetric" in str(sym)
    assert torch.equal(sym.dequantize(), asym.dequantize())
    buf = io.BytesIO()
    torch.save(sym.state_dict(), buf)
    buf.seek(0)
    fresh = Int4Linear(576, 72, 32, symmetric=True)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.dequantize(), sym.dequantize())
    with pytest.raises(Exception, match="symmetric"):
        Int4Linear(576, 72, 32, symmetric=True, scale_bits=8)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8, 40])  # GEMV rows, and a prefill
@pytest.mark.parametrize("activations", ["int8", "fp32"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_every_path_equals_zero_zero_points(rows, activations, isa, monkeypatch):
    if isa not in kernels.isas():
        pytest.skip(f"no {isa} kernels on this machine")
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    kernels.set_isa(isa)
    try:
        _check_paths(rows, activations)
    finally:
        kernels.set_isa(None)


def _check_paths(rows: int, activations: str) -> None:
    sym, asym = _pair()
    for m in (sym, asym):
        m.prefill_activations = activations
    x = torch.randn(rows, 576)
    with torch.no_grad():
        assert torch.equal(sym(x), asym(x))
        ops_sym, ops_asym = sym.decode_operands(), asym.decode_operands()
        assert ops_sym[3] is None and ops_asym[3] is not None
        ext = kernels.ext()
        y = ext.linear_q4(x[:1], sym.qweight, sym.scales, None, 32)
        assert torch.equal(y, ext.linear_q4(x[:1], asym.qweight, asym.scales, asym.zeros, 32))
        d = ext.dequant_q4(sym.qweight, sym.scales, None, 32, 576, False)
        assert torch.equal(d, ext.dequant_q4(asym.qweight, asym.scales, asym.zeros, 32, 576, False))
