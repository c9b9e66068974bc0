"""distributed/mirror.py on 2 forked gloo ranks: the Leader's forwards (prefill + decode into slot 1 of
a KV cache, with heartbeats while idle) are run by the follower, and rank 0 gets the one-process logits."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leanformer.loading import load
from leanformer.models.kv_cache import KVCache
from tests.distributed.ranks import PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(model, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill PROMPT into slot 1, then one decode step: → (prefill logits [1, 1, V], step logits)."""
    slots = torch.tensor([1])
    with torch.no_grad():
        first = model(
            torch.tensor([PROMPT]), cache=cache, slots=slots, logits_at=torch.tensor([len(PROMPT) - 1])
        )
        cache.advance(slots, len(PROMPT))
        step = model(first[:, -1:].argmax(-1), cache=cache, slots=slots)
        cache.advance(slots, 1)
    return first, step


def _worker(rank: int, init: str, path: str, out: str) -> None:
    from leanformer.distributed import parallelize_
    from leanformer.distributed.mirror import Leader, follow
    from leanformer.errors import LeanformerError
    from leanformer.models.kv_cache import ChainView

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        model, _ = load(path)
        parallelize_(model)
        cache = KVCache.for_model(model, 2, 64)
        if rank == 1:
            torch.save({"steps": follow(model, cache)}, Path(out) / "1.pt")
            return
        leader = Leader(model, heartbeat_s=0.05)
        time.sleep(0.4)  # idle: the follower receives empty steps, not forwards
        first, step = _steps(leader, cache)
        try:  # a cache with state the follower lacks: refused before anything is sent
            leader(torch.tensor([[1]]), cache=ChainView(cache, 0), slots=torch.tensor([0]))
            refused = ""
        except LeanformerError as e:
            refused = str(e)
        leader.stop()
        torch.save({"first": first, "step": step, "refused": refused}, Path(out) / "0.pt")
    finally:
        dist.destroy_process_group()


def test_follower_runs_the_leaders_forwards(shared, tmp_path):
    path = str(shared / "models" / "stories260K" / "stories260K.bin")
    model, _ = load(path)  # first: the forked ranks inherit what building a model imports (seconds)
    first, step = _steps(model, KVCache.for_model(model, 2, 64))
    args = (str(tmp_path / "rdv"), path, str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=2, start_method="fork")
    got, follower = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert (got["first"] - first).abs().max() < 1e-4 and (got["step"] - step).abs().max() < 1e-4
    assert follower["steps"] == 2  # the two forwards; heartbeats and the refused call are not steps
    assert got["refused"].startswith("serve --tp mirrors the slot and paged KV caches, not a ChainView")
