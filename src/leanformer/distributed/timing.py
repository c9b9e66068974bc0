"""Timing a split model: every rank's clock counts, the slowest rank sets the figure.

A tensor-parallel step ends only when every rank has its share (the all-reduces wait for the last
one), but rank 0's own clock can start late or stop early by what the others still have queued. So
each timed region starts after a barrier (all ranks start together), every rank times it, and the
figure is the maximum over the ranks (an all-reduce MAX of the times).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def slowest(times: list[float], group=None) -> list[float]:
    """Elementwise maximum of `times` over the ranks (every rank passes as many values)."""
    t = torch.tensor(times, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def timed(fn: Callable[[], object], group=None) -> float:
    """Seconds `fn()` took on the slowest rank, all ranks starting together."""
    if dist.is_initialized():
        dist.barrier(group)
    t0 = time.perf_counter()
    fn()
    return slowest([time.perf_counter() - t0], group)[0]


def median_timed(fn: Callable[[], object], repeats: int, group=None) -> float:
    """Median of `repeats` timed runs of `fn` after one warm-up, each timed on the slowest rank."""
    fn()
    return statistics.median(timed(fn, group) for _ in range(repeats))


def timed_steps(fn: Callable[[], list[float]], group=None) -> list[float]:
    """Per-step seconds `fn()` measured on every rank (after a barrier), the slowest rank's per step."""
    if dist.is_initialized():
        dist.barrier(group)
    return slowest(fn(), group)
