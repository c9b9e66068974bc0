"""KV cache: fixed slots that sequences occupy, each with its own length.

Layout per layer: k, v [n_slots, n_kv_heads, max_seq, head_dim]. A forward step names the slots its
rows use; row b's new tokens land at positions lengths[slot_b] .. + T - 1. Because every row has its
own length, one batch can mix sequences of different lengths (batched prompts of unequal length now,
continuous batching later), and freeing a slot is just resetting its length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformer.errors import LeanformerError
from leanformer.models.huge_pages import huge_zeros

STORAGES = ("int8", "fp16")  # besides None: K/V kept in the model's dtype


def store_dtype(storage: str | None, dtype: torch.dtype) -> torch.dtype:
    """The element type K/V are kept in: int8 codes (with scales), float16 (half the bytes of fp32
    with ~3 decimal digits, llama.cpp's default KV type), or the model's dtype."""
    if storage not in (None, *STORAGES):
        raise LeanformerError(
            f"unknown KV cache storage {storage!r}; choose {' or '.join(STORAGES)} or leave it unset"
        )
    return {"int8": torch.int8, "fp16": torch.float16}.get(storage, dtype)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), between fp16 and bf16 through fp32: the same values (one rounding either way), but
    torch's direct conversion between the two 16-bit types is a scalar loop, 3-5x the time (a bf16 model's
    fp16 KV cache is read back whole every step; an F16Linear's rows made bf16 for each prefill)."""
    if x.dtype != dtype and {x.dtype, dtype} == {torch.float16, torch.bfloat16}:
        return x.float().to(dtype)
    return x.to(dtype)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → (int8 codes [..., D], scale [..., 1]): one scale per (row, head, position). Every
    cache that stores int8 K/V rounds with this, so they all give the same outputs."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(x / scale).to(torch.int8), scale


def step_positions(
    lengths: torch.Tensor, slots: torch.Tensor, n_new: int, max_seq: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(starts [B], positions [B, T], key_len S) of a step appending n_new tokens to each slot, checked
    against the cache's capacity."""
    starts = lengths[slots]
    key_len = int(starts.max()) + n_new
    if key_len > max_seq:
        raise LeanformerError(
            f"sequence of {key_len} tokens exceeds the cache/context size {max_seq}; "
            "use a shorter prompt or fewer new tokens"
        )
    return starts, starts[:, None] + torch.arange(n_new)[None, :], key_len


def step_mask(
    starts: torch.Tensor, positions: torch.Tensor, n_new: int, key_len: int, device
) -> tuple[torch.Tensor | None, bool]:
    """(mask [B, 1, T, S] or None, is_causal) for new tokens at `positions` [B, T] after `starts` [B]."""
    if bool((starts == starts[0]).all()) and (n_new == 1 or int(starts[0]) == 0):
        # One query per row over all keys, or a fresh prefill: no explicit mask is needed.
        return None, n_new > 1
    keys = torch.arange(key_len)
    return (keys[None, None, None, :] <= positions[:, None, :, None]).to(device), False


@dataclass
class Step:
    """What one forward call needs to know about the cache; computed once, used by every layer."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] absolute positions of the new tokens
    key_len: int  # S: keys visible to this step (max over rows of length + T)
    mask: torch.Tensor | None  # [B, 1, T, S] bool, None when plain causal/full attention is exact
    is_causal: bool  # True when mask is None and the step is a fresh prefill (S == T)
    contiguous: int | None  # slots are 0..B-1 and all rows share one start: the start, else None
    # [B, T] RoPE positions when they differ from the cache positions (models/kv_policy.py: a slot
    # that evicted tokens keeps its true positions); None: the same as positions
    rope_positions: torch.Tensor | None = None


class KVCache:
    """storage="int8" keeps K and V as int8 with one scale per (slot, head, position): 4× less memory
    than fp32 (2× vs bf16) for long contexts and big batches; keys/values are dequantized as read.
    storage="fp16" keeps them as float16: half of fp32's memory and bandwidth, converted as read."""

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        storage: str | None = None,
    ) -> None:
        shape = (n_slots, n_kv_heads, max_seq, head_dim)
        store = store_dtype(storage, dtype)
        # on a CPU, one huge-page block for every layer's K and V when they are large (models/huge_pages.py)
        kv = huge_zeros(2 * n_layers, shape, store) if torch.device(device).type == "cpu" else None
        if kv is None:
            kv = [torch.zeros(shape, dtype=store, device=device) for _ in range(2 * n_layers)]
        self.k, self.v = kv[0::2], kv[1::2]  # layer by layer, as a decode step reads them
        scale_shape = (*shape[:3], 1)
        self.quantized = storage == "int8"
        n_scales = n_layers if self.quantized else 0
        self.k_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self.v_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(n_scales)]
        self.dtype = dtype
        self.lengths = torch.zeros(n_slots, dtype=torch.long)
        self.max_seq = max_seq
        self.n_slots = n_slots

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_seq: int) -> KVCache:
        """A cache shaped for `model`; int8 storage when quantize_(model, KVCache(dtype="int8")) ran."""
        a = model.args
        param = next(p for p in model.parameters() if p.is_floating_point())
        max_seq = min(max_seq, a.max_position_embeddings)
        storage = getattr(model, "kv_cache_dtype", None)
        return cls(
            a.num_hidden_layers,
            n_slots,
            max_seq,
            a.num_key_value_heads,
            a.head_dim,
            param.dtype,
            param.device,
            storage,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        """Plan a step that appends n_new tokens to each slot in `slots` [B]."""
        starts, positions, key_len = step_positions(self.lengths, slots, n_new, self.max_seq)
        same_start = bool((starts == starts[0]).all())
        b = len(slots)
        contiguous = int(starts[0]) if same_start and bool((slots == torch.arange(b)).all()) else None
        device = self.k[0].device
        mask, is_causal = step_mask(starts, positions, n_new, key_len, device)
        return Step(slots.to(device), positions.to(device), key_len, mask, is_causal, contiguous)

    def update(
        self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, D] for this step; return all visible keys/values [B, n_kv, S, D]."""
        if not self.quantized:  # fp16 storage: converted back as read (.to is free when the types match)
            k, v = self._put_get(self.k[layer], step, k), self._put_get(self.v[layer], step, v)
            return cast(k, self.dtype), cast(v, self.dtype)
        out = []
        for store, scales, x in (
            (self.k[layer], self.k_scale[layer], k),
            (self.v[layer], self.v_scale[layer], v),
        ):
            q, scale = quantize_kv(x)  # [B, n_kv, T, D] int8, [B, n_kv, T, 1]
            out.append(self._put_get(store, step, q).to(self.dtype) * self._put_get(scales, step, scale))
        return out[0], out[1]

    @staticmethod
    def _put_get(buf: torch.Tensor, step: Step, x: torch.Tensor) -> torch.Tensor:
        n_rows, n_new = x.shape[0], x.shape[2]
        if step.contiguous is not None:
            s0 = step.contiguous
            buf[:n_rows, :, s0 : s0 + n_new] = cast(x, buf.dtype)
            return buf[:n_rows, :, : step.key_len]
        # Rows of buf seen as [slots * n_kv * max_seq, D]: index_copy_ / index_select touch only the rows
        # named, where advanced indexing (buf[slots[:, None], :, positions]) walked the whole buffer:
        # measured ~100x slower (10 ms vs 0.1 ms per call at 16 slots x 2048 positions).
        _, n_kv, max_seq, d = buf.shape
        heads = torch.arange(n_kv, device=buf.device)
        flat = (step.slots[:, None, None] * n_kv + heads[None, :, None]) * max_seq + step.positions[
            :, None, :
        ]
        buf.view(-1, d).index_copy_(
            0, flat.reshape(-1), cast(x.reshape(-1, d), buf.dtype)
        )  # [B*n_kv*T] rows, order (b, h, t)
        return buf[:, :, : step.key_len].index_select(0, step.slots)

    def advance(self, slots: torch.Tensor, n: torch.Tensor | int) -> None:
        self.lengths[slots] += n

    def set_length(self, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slots] = lengths

    def reset(self, slots: torch.Tensor | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Roll slot back to its first `length` tokens (rejected speculative drafts). Entries past the
        length stay in memory but are never read: begin() sizes every step's keys from the lengths
        (key_len = start + n_new, masked per row beyond each row's position), the fused C++ step reads
        keys 0..position only, and the next step overwrites those positions before reading them."""
        if not 0 <= length <= int(self.lengths[slot]):
            raise LeanformerError(
                f"cannot truncate slot {slot} of {int(self.lengths[slot])} tokens to {length}"
            )
        self.lengths[slot] = length

    def chain(self, slot: int) -> ChainView:
        """A view whose next forward reads its B one-token rows as B consecutive tokens of `slot`."""
        return ChainView(self, slot)


class ChainView:
    """The cache as seen by a forward over `input_ids [B, 1]` whose rows are the next B tokens of ONE
    slot (speculative verification: [last token, draft 1..k]). Row b sits at position length + b and
    attends to keys 0..length + b, so the rows form one causal chain, yet each row is a one-token
    decode row: the model takes the same fused C++ decode step and GEMV kernels as plain decoding
    (every row writes its K/V before any row attends), which keeps greedy outputs token-for-token
    identical to plain decoding. Everything but begin() is the underlying cache's."""

    def __init__(self, cache: KVCache, slot: int) -> None:
        self._cache, self._slot = cache, slot

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        if n_new != 1:
            raise LeanformerError("a chained cache step takes one token per row (input_ids [B, 1])")
        c = self._cache
        b, start = len(slots), int(c.lengths[self._slot])
        key_len = start + b
        if key_len > c.max_seq:
            raise LeanformerError(f"sequence of {key_len} tokens exceeds the cache/context size {c.max_seq}")
        device = c.k[0].device
        positions = (start + torch.arange(b))[:, None]  # [B, 1]
        mask = torch.arange(key_len)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, 1, S]
        slot_ids = torch.full((b,), self._slot, dtype=torch.long, device=device)
        return Step(slot_ids, positions.to(device), key_len, mask.to(device), False, None)
