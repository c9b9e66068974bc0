"""kernels.greedy: clean_logits(logits).argmax(-1) in one threaded pass (kernels/argmax.cpp)."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels
from leanformer.engine.sampling import clean_logits, greedy_tokens

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 49152), (8, 49152), (3, 37), (2, 4097), (5, 10001), (4, 8)])
def test_equals_clean_argmax(shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        m, v = shape
        x[0, v // 3] = NAN  # never chosen, wherever it sits (vector body or scalar tail)
        x[0, v - 1] = NAN
        if m > 1:  # +inf counts as the largest float: the first one wins
            x[1, v // 2], x[1, v - 2] = INF, INF
        if m > 2:  # ties: the first maximum
            x[2] = 1.0
        if m > 3:  # nothing but -inf and NaN: token 0, as the cleaned all-zero row
            x[3] = -INF
            x[3, 1] = NAN
        assert torch.equal(kernels.ext().greedy(x), clean_logits(x).argmax(-1))
    finally:
        torch.set_num_threads(before)


def test_the_maximum_in_the_second_half_and_a_float_max_before_inf():
    x = torch.zeros(2, 9000)
    x[0, 8000] = 5.0  # the other thread's half
    x[1, 10], x[1, 20] = torch.finfo(torch.float32).max, INF  # equal once cleaned: the first
    assert kernels.ext().greedy(x).tolist() == [8000, 10]


def test_greedy_tokens_takes_it_and_refuses_nothing_odd():
    x = torch.randn(3, 700)
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
    assert torch.equal(greedy_tokens(x[:, ::2]), x[:, ::2].argmax(-1))  # non-contiguous rows
    assert greedy_tokens(torch.zeros(0, 5)).shape == (0,)
    with pytest.raises(RuntimeError, match="float32 logits"):
        kernels.ext().greedy(x.double())
