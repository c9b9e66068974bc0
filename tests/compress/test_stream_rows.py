"""Lean streaming (issue #12): the LM head / tied table rounded from row slices of the file, calibration
hidden states spilled to a temporary file, int4 rounding by row slices, GPTQ's in-place Hessian
inverse. Each must leave exactly the result of the plain computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.compress import apply, stream_rows
from leanformer.compress import double_quant as DQ
from leanformer.compress import int4 as I4
from leanformer.compress import kernels as K
from leanformer.compress.gptq import _inverse_hessian_chol
from leanformer.compress.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly
from leanformer.compress.spill import SpilledStates
from leanformer.errors import LeanformerError

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE = "model.embed_tokens.weight"
RECIPES = {  # the tied 512 x 64 table of stories260K, rounded by rows in each
    "gptq-int8+head-int8": [GPTQ(bits=8), Int8WeightOnly(targets=["lm_head"], ignore=[])],  # FileEmbedding
    "head-int4+awq-int8": [Int4WeightOnly(group_size=32, targets=["lm_head"], ignore=[]), AWQ(bits=8)],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_table_by_rows_equals_in_memory(shared, monkeypatch, name):
    monkeypatch.setattr(stream_rows, "ROWS_ELEMS", 64 * 7)  # 74 slices of 7 rows, the last one short
    path = shared / "models/stories260K"
    calib = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    whole, _ = lf.load(path)
    apply(whole, RECIPES[name], calib, progress=False)
    lazy, _ = lf.load(path, lazy=True)
    read_whole = []
    get = lazy.lazy.source.get
    monkeypatch.setattr(lazy.lazy.source, "get", lambda n: (read_whole.append(n), get(n))[1])
    apply(lazy, RECIPES[name], calib, progress=False)
    assert TABLE not in read_whole  # the float table was never in memory whole
    sa, sb = whole.state_dict(), lazy.state_dict()
    assert sa.keys() == sb.keys() and [n for n in sa if not torch.equal(sa[n], sb[n])] == []
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(whole(ids), lazy(ids))


def test_spilled_states_round_trip():
    store = SpilledStates()
    items = [torch.randn(2, 5, 3), torch.randn(1, 5, 3).transpose(1, 2), torch.zeros(0, 3)]  # one strided
    for t in items:
        store.append(t)
    assert len(store) == 3 and all(torch.equal(store[i], t) for i, t in enumerate(items))
    store[0] = items[0] * 2
    assert torch.equal(store[0], items[0] * 2) and torch.equal(store[1], items[1])
    with pytest.raises(LeanformerError, match="changed shape"):
        store[1] = torch.zeros(1, 1)
    store.close()


@pytest.mark.parametrize("n,k,group,scale_bits", [(300, 96, 32, 8), (300, 100, 32, None), (37, 100, 32, 8)])
def test_int4_rounding_by_row_slices(monkeypatch, n, k, group, scale_bits):
    monkeypatch.setattr(I4, "ROWS_ELEMS", 7 * k + 3)  # slices of 7 rows
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n)
    w = lin.weight.detach()
    m = I4.Int4Linear.from_linear(lin, group, scale_bits=scale_bits)
    if scale_bits:
        s, z = DQ.round_trip(*K.int4_params(w, group, bf16=False))
    else:
        s, z = K.int4_params(w, group)
    codes = nn.functional.pad(K.int4_codes(w, s, z, group), (0, m.k_padded - k), value=8)
    assert torch.equal(m.qweight, K.pack_nibbles(codes))
    ms, mz = m.group_params()  # scale_bits=8: decoded from the codes the module keeps
    assert torch.equal(ms, s) and torch.equal(mz, z)


def _old_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The formula before the in-place version (eye() and a dampened sum)."""
    hd = h + torch.eye(h.shape[0]) * (damp * torch.diagonal(h).mean().clamp_min(1e-8))
    chol, _ = torch.linalg.cholesky_ex(hd)
    return torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)[0]


def test_gptq_inverse_in_place_is_the_same():
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
    h = 2 * x.T @ x / 64
    expect = _old_inverse(h, 0.01)
    kept = h.clone()
    assert torch.equal(_inverse_hessian_chol(kept, 0.01), expect) and torch.equal(kept, h)
    box = [h.clone()]  # handed over: dampened in place, then freed
    assert torch.equal(_inverse_hessian_chol(box, 0.01), expect) and box == []
