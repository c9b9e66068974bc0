"""Pipeline parallel for a built Llama-family model: each rank keeps a contiguous slice of the layers.

Rank r of N keeps layers [lo_r, hi_r) (their weights and their KV cache only) and replaces the layer
list with one `Stage` module, so models/llama.py's forward runs unchanged:

    embed (every rank, cheap) → Stage: rank 0 runs its layers, sends x [B, T, hidden] to rank 1, which
    runs its layers, ... → the last rank broadcasts the final x → norm + LM head (every rank)

Every rank ends with the same logits and samples the same token, as with tensor parallel. What it
buys: each host holds 1/N of the layers (a model too large for one machine's memory). What it does
not buy: one sequence's decode is sequential through the ranks, so one stream is never faster; only
several micro-batches in flight at once would overlap the stages (not done here: the engine's decode
loop steps one batch at a time).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from leanformer.distributed.tensor_parallel import _share, check_splittable
from leanformer.errors import LeanformerError


class Stage(nn.Module):
    """This rank's layers between a receive from the previous rank and a send to the next."""

    def __init__(self, layers: list[nn.Module], rank: int, size: int, group) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.rank, self.size, self.group = rank, size, group

    def _peer(self, rank: int) -> int:
        """Global rank of `rank` in this group (send/recv/broadcast name global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def forward(self, x: torch.Tensor, rope, cache, step) -> torch.Tensor:
        # x [B, T, hidden]: every rank embedded the same ids, so x already has the shape to receive into
        x = x.contiguous()
        if self.rank > 0:
            dist.recv(x, src=self._peer(self.rank - 1), group=self.group)
        for layer in self.layers:
            x = layer(x, rope, cache, step)
        x = x.contiguous()
        if self.rank < self.size - 1:
            dist.send(x, dst=self._peer(self.rank + 1), group=self.group)
        dist.broadcast(x, src=self._peer(self.size - 1), group=self.group)
        return x


def pipeline_(model: nn.Module, group=None) -> nn.Module:
    """Keep this rank's share of the layers of a built Llama-family model (in place); returns it.

    Afterwards `model.args.num_hidden_layers` is the local count (KVCache.for_model then holds only
    the local layers' cache; the kept layers are renumbered 0..k-1 for it) and `model.pp = (rank, size)`.
    The fused C++ decode step is off: the send / receive sits between layers.
    """
    check_splittable(model, "pipeline parallel")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n = model.args.num_hidden_layers
    if size > n:
        raise LeanformerError(f"pipeline size {size} exceeds this model's {n} layers; allowed: 1 to {n}")
    lo, hi = _share(n, rank, size)
    kept = list(model.model.layers)[lo:hi]  # the other layers' weights are freed with the old list
    for i, block in enumerate(kept):
        block.self_attn.layer_idx = i  # index into this rank's cache, which holds only its layers
    model.model.layers = nn.ModuleList([Stage(kept, rank, size, group)])
    model.args = dataclasses.replace(model.args, num_hidden_layers=hi - lo)
    model.fused_decode = False
    model.pp = (rank, size)
    return model
