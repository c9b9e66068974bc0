"""kernels.ObjectIdentity: the fused stack's staleness check (models/fused.py DecodePlan.get)."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")


def test_holds_until_an_object_is_swapped_or_removed():
    lin = torch.nn.Linear(4, 4)
    params, mods = lin._parameters, {"a": lin}
    ident = kernels.ext().ObjectIdentity([(params, "weight", lin.weight), (mods, "a", lin)])
    assert len(ident) == 2 and ident.holds()
    lin.weight.data.mul_(2)  # in place: the same object (the stack reads the same storage)
    assert ident.holds()
    lin.weight = torch.nn.Parameter(torch.zeros(4, 4))
    assert not ident.holds()
    ident = kernels.ext().ObjectIdentity([(mods, "a", lin)])
    del mods["a"]
    assert not ident.holds()


def test_entries_must_be_dict_key_object():
    with pytest.raises(RuntimeError, match="identity entries"):
        kernels.ext().ObjectIdentity([([], "k", 1)])


def test_unhashable_key_raises_instead_of_passing():
    ident = kernels.ext().ObjectIdentity([({}, [1], 1)])
    with pytest.raises(TypeError):
        ident.holds()
