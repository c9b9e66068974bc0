"""KV cache: fixed slots that sequences occupy, each with its own length.

Layout per layer: k, v [n_slots, n_kv_heads, max_seq, head_dim]. A forward step names the slots its
rows use; row b's new tokens land at positions lengths[slot_b] .. + T - 1. Because every row has its
own length, one batch can mix sequences of different lengths (batched prompts of unequal length now,
continuous batching later), and freeing a slot is just resetting its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LeanformerError


@dataclass
class Step:
    """What one forward call needs to know about the cache; computed once, used by every layer."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] absolute positions of the new tokens
    key_len: int  # S: keys visible to this step (max over rows of length + T)
    mask: torch.Tensor | None  # [B, 1, T, S] bool, None when plain causal/full attention is exact
    is_causal: bool  # True when mask is None and the step is a fresh prefill (S == T)
    contiguous: int | None  # slots are 0..B-1 and all rows share one start: the start, else None


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_slots, n_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long)
        self.max_seq = max_seq
        self.n_slots = n_slots

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_seq: int) -> KVCache:
        a = model.args
        param = next(model.parameters())
        dtype = param.dtype if param.is_floating_point() else torch.float32
        max_seq = min(max_seq, a.max_position_embeddings)
        return cls(
            a.num_hidden_layers, n_slots, max_seq, a.num_key_value_heads, a.head_dim, dtype, param.device
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        """Plan a step that appends n_new tokens to each slot in `slots` [B]."""
        starts = self.lengths[slots]  # [B]
        key_len = int(starts.max()) + n_new
        if key_len > self.max_seq:
            raise LeanformerError(
                f"sequence of {key_len} tokens exceeds the cache/context size {self.max_seq}; "
                "use a shorter prompt or fewer new tokens"
            )
        positions = starts[:, None] + torch.arange(n_new)[None, :]  # [B, T]
        same_start = bool((starts == starts[0]).all())
        b = len(slots)
        contiguous = int(starts[0]) if same_start and bool((slots == torch.arange(b)).all()) else None
        device = self.k[0].device
        if same_start and (n_new == 1 or int(starts[0]) == 0):
            # One query per row over all keys, or a fresh prefill: no explicit mask is needed.
            mask, is_causal = None, n_new > 1
        else:
            keys = torch.arange(key_len)
            mask = (keys[None, None, None, :] <= positions[:, None, :, None]).to(device)
            is_causal = False
        return Step(slots.to(device), positions.to(device), key_len, mask, is_causal, contiguous)

    def update(
        self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, D] for this step; return all visible keys/values [B, n_kv, S, D]."""
        kc, vc = self.k[layer], self.v[layer]
        n_rows, n_new = k.shape[0], k.shape[2]
        if step.contiguous is not None:
            s0 = step.contiguous
            kc[:n_rows, :, s0 : s0 + n_new] = k
            vc[:n_rows, :, s0 : s0 + n_new] = v
            return kc[:n_rows, :, : step.key_len], vc[:n_rows, :, : step.key_len]
        rows = step.slots[:, None]  # [B, 1] broadcast with positions [B, T] → indexed shape [B, T, n_kv, D]
        kc[rows, :, step.positions] = k.transpose(1, 2)
        vc[rows, :, step.positions] = v.transpose(1, 2)
        return kc[step.slots, :, : step.key_len], vc[step.slots, :, : step.key_len]

    def advance(self, slots: torch.Tensor, n: torch.Tensor | int) -> None:
        self.lengths[slots] += n

    def set_length(self, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slots] = lengths

    def reset(self, slots: torch.Tensor | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0
