"""Pipeline parallel for a built Llama-family model: each rank keeps a contiguous slice of the layers.

Rank r of N keeps layers [lo_r, hi_r) (their weights and their KV cache only) and replaces the layer
list with one `Stage` module, so models/llama.py's forward runs unchanged:

    embed (every rank, cheap) → Stage: rank 0 runs its layers, sends x [B, T, hidden] to rank 1, which
    runs its layers, ... → the last rank broadcasts the final x → norm + LM head (every rank)

Every rank ends with the same logits and samples the same token, as with tensor parallel. What it
buys: each host holds 1/N of the layers (a model too large for one machine's memory).

Micro-batches (GPipe's forward schedule): a batch of B independent rows is cut into M micro-batches
of rows; a stage runs micro-batch m, hands it on with a non-blocking send and goes on to m+1 while the
next stage runs m, so the N stages work at the same time on different rows:

    rank 0: [m0][m1][m2][m3]
    rank 1:     [m0][m1][m2][m3]

With W the work of one stage on the whole batch, one forward takes N·W without micro-batches and
(M + N − 1)·W/M with them (the fill and drain of the pipeline are the N − 1 extra slots).
Each row's arithmetic is unchanged (rows never mix), so the logits equal the one-process model's.
One sequence's decode (B = 1) has nothing to split and stays sequential through the ranks; rows that
are one chained sequence (speculative verification) or a cache without the plain Step are run whole.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from leanformer.distributed.tensor_parallel import _share, check_splittable
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache, Step


class Stage(nn.Module):
    """This rank's layers between a receive from the previous rank and a send to the next, in
    micro-batches of rows when the batch allows (see the module docstring)."""

    def __init__(self, layers: list[nn.Module], rank: int, size: int, group, micro_batches: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.rank, self.size, self.group = rank, size, group
        self.micro_batches = micro_batches

    def _peer(self, rank: int) -> int:
        """Global rank of `rank` in this group (send/recv/broadcast name global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def forward(self, x: torch.Tensor, rope, cache, step) -> torch.Tensor:
        # x [B, T, hidden]: every rank embedded the same ids, so x already has the shape to receive into
        pieces = []
        sends = []
        for rows in _row_spans(x.shape[0], self.micro_batches if _splittable(cache, step) else 1):
            xm = x[rows].contiguous()  # [b, T, hidden]: this micro-batch's rows
            if self.rank > 0:
                dist.recv(xm, src=self._peer(self.rank - 1), group=self.group)
            rope_m, step_m = _rows_of(rope, step, rows, x.shape[0])
            for layer in self.layers:
                xm = layer(xm, rope_m, cache, step_m)
            xm = xm.contiguous()
            if self.rank < self.size - 1:  # the next stage starts on it while this one goes on
                sends.append(dist.isend(xm, dst=self._peer(self.rank + 1), group=self.group))
            pieces.append(xm)
        for work in sends:
            work.wait()
        x = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        dist.broadcast(x, src=self._peer(self.size - 1), group=self.group)
        return x


def _row_spans(b: int, m: int) -> list[slice]:
    """m (at most b) slices covering rows 0..b-1, sizes differing by at most one."""
    m = max(1, min(m, b))
    return [slice(*_share(b, i, m)) for i in range(m)]


def _splittable(cache, step) -> bool:
    """Rows may run apart: no cache (rows independent), or the plain cache's Step over distinct slots
    (a chained speculative step has one slot on every row; other caches plan steps of their own)."""
    if step is None:
        return cache is None
    return type(step) is Step and type(cache) is KVCache and len(set(step.slots.tolist())) == len(step.slots)


def _rows_of(rope, step, rows: slice, b: int):
    """rope (cos, sin) [(B,) T, 1, D] and the Step for rows `rows` of a batch of b."""
    if rows == slice(0, b):
        return rope, step
    if rope is not None and rope[0].dim() == 4:  # per-row positions (with a cache)
        rope = (rope[0][rows], rope[1][rows])
    if step is not None:
        step = dataclasses.replace(
            step,
            slots=step.slots[rows],
            positions=step.positions[rows],
            mask=None if step.mask is None else step.mask[rows],
            rope_positions=None if step.rope_positions is None else step.rope_positions[rows],
            contiguous=None,  # rows a..b-1 are not slots 0..b-a-1: take the indexed path
        )
    return rope, step


def pipeline_(model: nn.Module, group=None, micro_batches: int | None = None) -> nn.Module:
    """Keep this rank's share of the layers of a built Llama-family model (in place); returns it.

    micro_batches: rows per forward are cut into this many micro-batches (default: one per stage;
    1 = the whole batch at once); every rank must pass the same value.

    Afterwards `model.args.num_hidden_layers` is the local count (KVCache.for_model then holds only
    the local layers' cache; the kept layers are renumbered 0..k-1 for it) and `model.pp = (rank, size)`.
    The fused C++ decode step is off: the send / receive sits between layers.
    """
    check_splittable(model, "pipeline parallel")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n = model.args.num_hidden_layers
    if size > n:
        raise LeanformerError(f"pipeline size {size} exceeds this model's {n} layers; allowed: 1 to {n}")
    m = size if micro_batches is None else micro_batches
    if m < 1:
        raise LeanformerError(f"micro_batches must be at least 1, got {m}")
    lo, hi = _share(n, rank, size)
    kept = list(model.model.layers)[lo:hi]  # the other layers' weights are freed with the old list
    for i, block in enumerate(kept):
        block.self_attn.layer_idx = i  # index into this rank's cache, which holds only its layers
    model.model.layers = nn.ModuleList([Stage(kept, rank, size, group, m)])
    model.args = dataclasses.replace(model.args, num_hidden_layers=hi - lo)
    model.fused_decode = False
    model.pp = (rank, size)
    return model
