"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from leanformer import kernels as K
from leanformer.kernels import cpu


@pytest.fixture(params=["avx2", "avx_vnni", "avx512_vnni"])
def act_isa(request):
    """Each instruction set of the int8-activation kernels this CPU offers (the others skip, saying why)."""
    if request.param not in cpu.act_isas():
        pytest.skip(f"this CPU lacks {request.param} (has {cpu.act_isas()})")
    cpu.set_act_isa(request.param)
    yield request.param
    cpu.set_act_isa(None)


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Runs the test with the GEMV / attention kernels forced to one instruction set, then restores the best."""
    if request.param not in K.isas():
        pytest.skip(f"no {request.param} kernels on this machine")
    K.set_isa(request.param)
    yield request.param
    K.set_isa(None)
