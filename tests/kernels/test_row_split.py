"""The int8-activation GEMVs' balanced row split (kernels/row_split.h): each thread streams its own part
in blocks and takes what is left at the back of the others' parts. Which thread computes a row, and in
which block, must never change the row: the result at any thread count equals the one-thread result bit
for bit, and the float64 reference of the same quantized math."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels as K
from leanformer.kernels.int8_act import ref_linear_q4_i8, ref_linear_q8_i8

pytestmark = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")


def at_threads(fn, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# rows: many blocks per part (3000), a count no block or part size divides (1001), one part only (40)
@pytest.mark.parametrize("n", [3000, 1001, 40])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_q4_rows_do_not_depend_on_the_split(act_isa, n, m):
    g = torch.Generator().manual_seed(n + m)
    k = 576
    x = torch.randn(m, k, generator=g)
    wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // 32, generator=g) * 0.02
    z = torch.randn(n, k // 32, generator=g) * 0.01
    for zeros in (None, z):
        run = lambda zeros=zeros: K.ext().linear_q4_i8(x, wq, s, zeros, 32, None)  # noqa: E731
        one = at_threads(run, 1)
        for threads in (2, 3, 4, 12):  # 12: more parts than the splitter keeps on the stack
            assert torch.equal(at_threads(run, threads), one), (threads, zeros is None)
        zz = torch.zeros_like(s) if zeros is None else zeros
        ref = ref_linear_q4_i8(x, wq, s, zz, 32)
        assert torch.allclose(one.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", [0, 32])
def test_q8_rows_do_not_depend_on_the_split(act_isa, group):
    g = torch.Generator().manual_seed(group)
    n, k = 2500, 576
    x = torch.randn(2, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 if group == 0 else torch.rand(n, k // group, generator=g) * 0.01
    run = lambda: K.ext().linear_q8_i8(x, w, s, None, group)  # noqa: E731
    one = at_threads(run, 1)
    for threads in (2, 3):
        assert torch.equal(at_threads(run, threads), one), threads
    ref = ref_linear_q8_i8(x, w, s, None, group)
    assert torch.allclose(one.double(), ref, rtol=1e-5, atol=1e-4)
