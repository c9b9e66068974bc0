"""Joining the process group that torchrun set up, for the CLI's `--tp N`.

torchrun gives each process its rank and the rendezvous address; `init_process_group` reads them
(the env:// method), so nothing here reads the environment itself.
"""

from __future__ import annotations

import atexit

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
    if dist.is_initialized():
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
