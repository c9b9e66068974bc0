"""Joining the process group that torchrun set up, for the CLI's `--tp N`.

torchrun gives each process its rank and the rendezvous address; `init_process_group` reads them
(the env:// method), so nothing here reads the environment itself.
"""

from __future__ import annotations

import atexit
import contextlib
import io
from datetime import timedelta

import torch
import torch.distributed as dist

from leanformer.errors import LeanformerError


def join(size: int, flag: str = "--tp", backend: str = "gloo") -> tuple[int, int]:
    """Join (or reuse) the default process group and check it has `size` ranks; → (rank, size).

    gloo because the model runs on CPU; one torch thread per rank unless torchrun was told otherwise
    is torchrun's own default (OMP_NUM_THREADS=1 with more than one process).
    """
    if not dist.is_available():
        raise LeanformerError("this torch build has no torch.distributed; --tp needs it")
    if not dist.is_initialized():
        if not dist.is_torchelastic_launched():
            raise LeanformerError(
                f"{flag} {size} needs {size} processes: run it as "
                f"`torchrun --standalone --nproc-per-node {size} --no-python leanformer ...`"
            )
        dist.init_process_group(backend)
        atexit.register(_leave)
    world = dist.get_world_size()
    if world != size:
        raise LeanformerError(f"{flag} {size} but torchrun started {world} processes; make them equal")
    return dist.get_rank(), world


def _leave() -> None:
    """At exit: leave together, then tear down. A rank that destroyed its gloo group while another was
    still in its last collective or its own teardown closed the pairs under it (rank 1 was seen to
    abort with SIGABRT at exit, rarely, after printing the same text)."""
    if dist.is_initialized():
        # bounded: a rank that failed mid-run may sit in a collective that never matches this one
        with contextlib.suppress(Exception):  # (or be gone already: nothing to wait for)
            dist.monitored_barrier(timeout=timedelta(seconds=10))
        dist.destroy_process_group()


def shared_seed(seed: int | None) -> int | None:
    """The same sampling seed on every rank: rank 0's draw when none was given.

    Every rank samples from identical logits; with a temperature they must also draw the same
    random numbers, or their sequences (and KV caches) part and the next all-reduce mixes them.
    """
    if seed is not None or not dist.is_initialized() or dist.get_world_size() == 1:
        return seed
    t = (
        torch.randint(0, 2**62, (1,), dtype=torch.long)
        if dist.get_rank() == 0
        else torch.zeros(1, dtype=torch.long)
    )
    dist.broadcast(t, src=0)
    return int(t)


class SharedStdin(io.TextIOBase):
    """stdin as every rank of a torchrun job sees it under `chat --tp N`: rank 0 reads each line from
    the real stdin and broadcasts it, so `input()` returns the same line (or EOF) on every rank.

    `input()` falls back to `sys.stdin.readline()` for an object without a file number, so the chat
    loop needs no change; every rank calls readline the same number of times (the same program).
    """

    def __init__(self, real, group=None) -> None:
        super().__init__()
        self.real, self.group = real, group

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> str:
        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        box = [self.real.readline() if dist.get_rank(self.group) == 0 else None]
        dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]
