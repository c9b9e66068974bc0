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

The fused C++ decode step (models/fused.py, kernels/decode.cpp) reads and writes the pools in place
for a one-token step: `fused_rows()` gives it the pool row of every visible key per (step row, head)
and of every new K/V, the same rows `update()` uses. (It used to gather each step's keys into
[B, n_kv, S, D] views and copy the new rows back: ~12% of the server's engine thread at 4 streams.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformer.errors import LeanformerError
from leanformer.models.huge_pages import huge_zeros
from leanformer.models.kv_cache import Step, cast, quantize_kv, step_mask, step_positions, store_dtype


@dataclass
class PagedStep(Step):
    """A Step plus the pool rows it writes and reads (pool seen as [blocks * n_kv * block_size, D])."""

    write_rows: torch.Tensor | None = None  # [B * n_kv * T] rows for the new k/v, order (b, h, t)
    read_rows: torch.Tensor | None = None  # [B * n_kv * S] rows of the visible keys, order (b, h, s)


class PagedKVCache:
    """storage="int8": K and V as int8 with one scale per (block, head, position), as KVCache does;
    storage="fp16": K and V as float16."""

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
        store = store_dtype(storage, dtype)
        if num_blocks < 1 or block_size < 1 or n_slots < 1:
            raise LeanformerError(
                "a paged KV cache needs at least one block of at least one token and one slot"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.trash = num_blocks  # the extra pool block that unassigned table entries point at
        shape = (num_blocks + 1, n_kv_heads, block_size, head_dim)
        # on a CPU, the pools in one huge-page block when large, as KVCache's (models/huge_pages.py): a
        # block's keys are 1-8 KB, and a step's reads jump from block to block over 4 KB pages
        pools = huge_zeros(2 * n_layers, shape, store) if torch.device(device).type == "cpu" else None
        if pools is None:
            pools = [torch.zeros(shape, dtype=store, device=device) for _ in range(2 * n_layers)]
        self.k_pool, self.v_pool = pools[0::2], pools[1::2]  # K0, V0, K1, ... as a step reads them
        self.quantized = storage == "int8"
        n_scales = n_layers if self.quantized else 0
        scale_shape = (*shape[:3], 1)
        self.k_scale_pool = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self.v_scale_pool = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self._step: PagedStep | None = None  # the last begin()'s step when one token per row (fused_rows)
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
            t.numel() * t.element_size()
            for t in self.k_pool + self.v_pool + self.k_scale_pool + self.v_scale_pool
        )

    def block_nbytes(self) -> int:
        """Bytes one block costs over all layers (K, V and their scales)."""
        return self.nbytes() // (self.num_blocks + 1)

    # ---- the KVCache interface ----
    def begin(self, slots: torch.Tensor, n_new: int) -> PagedStep:
        """Plan a step that appends n_new tokens to each slot in `slots` [B]; the caller has given every
        row blocks up to its length + n_new (positions past that fall on the trash block)."""
        starts, positions, key_len = step_positions(self.lengths, slots, n_new, self.max_seq)
        mask, is_causal = step_mask(starts, positions, n_new, key_len, self.device)
        tables = self.block_tables[slots]  # [B, max_blocks]
        write = self._rows(tables, positions)  # [B, n_kv, T]
        read = self._rows(tables, torch.arange(key_len).expand(len(slots), key_len))  # [B, n_kv, S]
        # slots index nothing here (update() and the fused step use the rows): the batch rows
        step = PagedStep(
            torch.arange(len(slots), device=self.device), positions.to(self.device), key_len, mask, is_causal, None,
            write_rows=write.reshape(-1).to(self.device), read_rows=read.reshape(-1).to(self.device),
        )  # fmt: skip
        self._step = step if n_new == 1 else None
        return step

    # ---- the fused decode step ----
    @property
    def fused_layout(self) -> bool:
        """models/fused.py: whether this step may run as the C++ decode step (one token per row)."""
        return self._step is not None

    # the pools, as the fused step takes a cache's per-layer K/V (and int8 scales)
    k = property(lambda self: self.k_pool)
    v = property(lambda self: self.v_pool)
    k_scale = property(lambda self: self.k_scale_pool)
    v_scale = property(lambda self: self.v_scale_pool)

    def fused_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(read [B, n_kv, S], write [B, n_kv]): the pool rows of this one-token step's visible keys and
        of its new K/V, per step row and KV head (kernels/decode.cpp StepRows)."""
        st = self._step
        if st is None:
            raise LeanformerError("the paged KV cache runs the fused step only for one token per row")
        b = st.positions.shape[0]
        return st.read_rows.view(b, self.n_kv, st.key_len), st.write_rows.view(b, self.n_kv)

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
        if not self.quantized:  # fp16 storage: converted back as read
            k, v = self._put_get(self.k_pool[layer], step, k), self._put_get(self.v_pool[layer], step, v)
            return cast(k, self.dtype), cast(v, self.dtype)
        out = []
        for store, scales, x in (
            (self.k_pool[layer], self.k_scale_pool[layer], k),
            (self.v_pool[layer], self.v_scale_pool[layer], v),
        ):
            q, scale = quantize_kv(x)  # the same rounding as KVCache's int8 storage
            out.append(self._put_get(store, step, q).to(self.dtype) * self._put_get(scales, step, scale))
        return out[0], out[1]

    @staticmethod
    def _put_get(pool: torch.Tensor, step: PagedStep, x: torch.Tensor) -> torch.Tensor:
        b, n_kv, _, d = x.shape
        flat = pool.view(-1, d)
        flat.index_copy_(0, step.write_rows, cast(x.reshape(-1, d), pool.dtype))
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
