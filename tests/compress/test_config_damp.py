"""The dampening fraction of every Hessian-based config is checked in one place, with one-line errors."""

from __future__ import annotations

import pytest

from leanformer.compress.config import GPTQ, LowRank, PruneFFN, PruneHeads, SparseGPT
from leanformer.errors import LeanformerError


@pytest.mark.parametrize("cls", [GPTQ, SparseGPT, PruneFFN, PruneHeads, LowRank])
@pytest.mark.parametrize("damp", [-0.1, 1.0, 5.0, float("nan")])
def test_bad_damp_is_one_line(cls, damp):
    kw = {"sparsity": 0.25} if cls is PruneHeads else {}
    with pytest.raises(LeanformerError, match=rf"^{cls.__name__}: damp must be in \[0, 1\)"):
        cls(damp=damp, **kw).validate()
