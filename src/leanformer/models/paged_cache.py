"""Paged KV cache: a pool of fixed-size blocks per layer, and a block table per sequence (vLLM's layout).

Layout per layer: k, v pools [num_blocks + 1, n_kv_heads, block_size, head_dim]; block_tables
[n_slots, max_blocks] names the pool block holding positions i*block_size .. (i+1)*block_size - 1 of
slot s. The last pool block is a trash block: every table entry not yet given a block points at it, so
the padding a batched prefill writes past a row's blocks lands there (never in a block another
sequence owns) and the mask hides what is read from it.

Same interface as models/kv_cache.KVCache (begin / update / advance / set_length / reset / truncate,
per-slot lengths), so the model families need no change: a slot here is a row of the block table, cheap,
and memory is spent only on the blocks a sequence really holds. Which block a table entry names is the
block manager's business (engine/block_manager.py); blocks holding a shared prompt prefix appear in
several tables at once and are only ever read (writes land at positions ≥ the cached prefix).

`fused_layout = False` keeps models/fused.py's C++ decode step (which indexes [slot, head, position]
tensors) off this cache: the module path gathers each row's blocks per layer instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import Step


@dataclass
class PagedStep(Step):
    """A Step plus the pool rows it writes and reads (pool seen as [blocks * n_kv * block_size, D])."""

    write_rows: torch.Tensor | None = None  # [B * n_kv * T] rows for the new k/v, order (b, h, t)
    read_rows: torch.Tensor | None = None  # [B * n_kv * S] rows of the visible keys, order (b, h, s)


class PagedKVCache:
    """storage="int8": K and V as int8 with one scale per (block, head, position), as KVCache does."""

    fused_layout = False  # models/fused.py: this cache cannot take the one-call C++ decode step

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq: int,
        n_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        storage: str | None = None,
    ) -> None:
        if storage not in (None, "int8"):
            raise LeanformerError(f"unknown KV cache storage {storage!r}; choose int8 or leave it unset")
        if num_blocks < 1 or block_size < 1 or n_slots < 1:
            raise LeanformerError(
                "a paged KV cache needs at least one block of at least one token and one slot"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.trash = num_blocks  # the extra pool block that unassigned table entries point at
        shape = (num_blocks + 1, n_kv_heads, block_size, head_dim)
        store = torch.int8 if storage == "int8" else dtype
        self.k_pool = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.v_pool = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.quantized = storage == "int8"
        n_scales = n_layers if self.quantized else 0
        scale_shape = (*shape[:3], 1)
        self.k_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self.v_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self.dtype, self.device = dtype, torch.device(device)
        self.n_kv, self.head_dim = n_kv_heads, head_dim
        self.max_seq, self.n_slots = max_seq, n_slots
        self.max_blocks = -(-max_seq // block_size)
        self.block_tables = torch.full((n_slots, self.max_blocks), self.trash, dtype=torch.long)
        self.lengths = torch.zeros(n_slots, dtype=torch.long)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, n_slots: int, max_seq: int, num_blocks: int, block_size: int
    ) -> PagedKVCache:
        """A paged cache shaped for `model`; int8 storage when the model asks for an int8 KV cache."""
        a = model.args
        param = next(p for p in model.parameters() if p.is_floating_point())
        max_seq = min(max_seq, a.max_position_embeddings)
        storage = getattr(model, "kv_cache_dtype", None)
        return cls(
            a.num_hidden_layers, n_slots, max_seq, a.num_key_value_heads, a.head_dim,
            num_blocks, block_size, param.dtype, param.device, storage,
        )  # fmt: skip

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in self.k_pool + self.v_pool + self.k_scale + self.v_scale
        )

    def block_nbytes(self) -> int:
        """Bytes one block costs over all layers (K, V and their scales)."""
        return self.nbytes() // (self.num_blocks + 1)

    # ---- the KVCache interface ----
    def begin(self, slots: torch.Tensor, n_new: int) -> PagedStep:
        """Plan a step that appends n_new tokens to each slot in `slots` [B]; the caller has given every
        row blocks up to its length + n_new (positions past that fall on the trash block)."""
        starts = self.lengths[slots]  # [B]
        key_len = int(starts.max()) + n_new
        if key_len > self.max_seq:
            raise LeanformerError(
                f"sequence of {key_len} tokens exceeds the cache/context size {self.max_seq}; "
                "use a shorter prompt or fewer new tokens"
            )
        positions = starts[:, None] + torch.arange(n_new)[None, :]  # [B, T]
        if bool((starts == starts[0]).all()) and (n_new == 1 or int(starts[0]) == 0):
            mask, is_causal = None, n_new > 1  # as KVCache: no explicit mask is needed
        else:
            keys = torch.arange(key_len)
            mask = (keys[None, None, None, :] <= positions[:, None, :, None]).to(self.device)
            is_causal = False
        tables = self.block_tables[slots]  # [B, max_blocks]
        write = self._rows(tables, positions)  # [B, n_kv, T]
        read = self._rows(tables, torch.arange(key_len).expand(len(slots), key_len))  # [B, n_kv, S]
        return PagedStep(
            slots.to(self.device), positions.to(self.device), key_len, mask, is_causal, None,
            write_rows=write.reshape(-1).to(self.device), read_rows=read.reshape(-1).to(self.device),
        )  # fmt: skip

    def _rows(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tables [B, max_blocks], positions [B, T] → pool rows [B, n_kv, T] of the flat [N*n_kv*bs, D] view."""
        bs = self.block_size
        blocks = tables.gather(1, (positions // bs).clamp_max(self.max_blocks - 1))  # [B, T]
        heads = torch.arange(self.n_kv)[None, :, None]
        return (blocks[:, None, :] * self.n_kv + heads) * bs + (positions % bs)[:, None, :]

    def update(
        self, layer: int, step: PagedStep, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, D] into their blocks; return all visible keys/values [B, n_kv, S, D]."""
        if not self.quantized:
            return self._put_get(self.k_pool[layer], step, k), self._put_get(self.v_pool[layer], step, v)
        out = []
        for store, scales, x in (
            (self.k_pool[layer], self.k_scale[layer], k),
            (self.v_pool[layer], self.v_scale[layer], v),
        ):
            # the same rounding as KVCache's int8 storage, so both caches give the same outputs
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127  # [B, n_kv, T, 1]
            q = torch.round(x / scale).to(torch.int8)
            out.append(self._put_get(store, step, q).to(self.dtype) * self._put_get(scales, step, scale))
        return out[0], out[1]

    @staticmethod
    def _put_get(pool: torch.Tensor, step: PagedStep, x: torch.Tensor) -> torch.Tensor:
        b, n_kv, _, d = x.shape
        flat = pool.view(-1, d)
        flat.index_copy_(0, step.write_rows, x.reshape(-1, d))
        return flat.index_select(0, step.read_rows).view(b, n_kv, step.key_len, d)

    def advance(self, slots: torch.Tensor, n: torch.Tensor | int) -> None:
        self.lengths[slots] += n

    def set_length(self, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slots] = lengths

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Forget the slots' tokens and blocks (the block manager owns what the blocks hold)."""
        if slots is None:
            self.lengths.zero_()
            self.block_tables.fill_(self.trash)
        else:
            self.lengths[slots] = 0
            self.block_tables[slots] = self.trash

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= int(self.lengths[slot]):
            raise LeanformerError(
                f"cannot truncate slot {slot} of {int(self.lengths[slot])} tokens to {length}"
            )
        self.lengths[slot] = length
