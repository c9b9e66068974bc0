"""kernels/team.h: the fused decode step's one parallel region. Inside a Team, parallel_for hands each
thread the same pieces at::parallel_for would, a failing piece raises on the caller (from the driving
thread or from a waiting one) and leaves nothing waiting, and a region runs thousands of pieces, also
with more threads than CPUs."""

from __future__ import annotations

import threading

import pytest
import torch

from leanformer import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="C++ kernels unavailable")


def pieces(n: int, grain: int, team: bool, times: int = 1, throw_at: int = -1) -> list[tuple]:
    return K.ext().team_pieces(n, grain, times, team, throw_at)


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """1: no team; 2: a team (on 2+ CPUs); 3: a team of 3, or on fewer CPUs torch's own regions (team.h
    steps aside when threads would outnumber the CPUs) — the same pieces either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "n, grain", [(0, 1), (1, 1), (2, 1), (5, 1), (7, 2), (9, 64), (100, 16), (64, 64), (65, 64)]
)
def test_pieces_are_torchs(threads, n, grain):
    got = sorted(pieces(n, grain, team=True))
    assert got == sorted(pieces(n, grain, team=False))
    assert sum(e - b for _, b, e in got) == n  # every index once
    assert {t for t, _, _ in got} <= set(range(threads))


def test_a_region_runs_many_pieces(threads):
    got = pieces(10, 1, team=True, times=2000)
    assert len(got) == 2000 * min(threads, 10)
    assert sorted(set(got)) == sorted(pieces(10, 1, team=False))


def _no_hang(fn, seconds: float = 60.0):
    """fn() in a thread (the kernels release the GIL); fails instead of hanging if it never returns."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the team never returned"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("where", ["driver", "waiting thread"])
def test_a_failing_piece_raises_and_frees_the_team(threads, where):
    if where == "waiting thread" and threads == 1:
        pytest.skip("one thread: no waiting thread")
    first = {t: b for t, b, _ in pieces(10, 1, team=False)}  # each thread's piece: where it begins
    throw_at = first[0] if where == "driver" else first[max(first)]
    with pytest.raises(RuntimeError, match=f"piece at {throw_at} failed"):
        _no_hang(lambda: pieces(10, 1, team=True, times=3, throw_at=throw_at))
    # the pool is usable afterwards, in a team and outside one
    assert len(_no_hang(lambda: pieces(10, 1, team=True, times=3))) == 3 * min(threads, 10)
    assert torch.ones(1 << 20).sum().item() == 1 << 20
