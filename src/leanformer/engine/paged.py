"""Continuous batching over a paged KV cache with prefix caching (the server's default cache).

PagedScheduler is the Scheduler (engine/scheduler.py) with its KV-memory hooks filled in by a
BlockManager (engine/block_manager.py) over a PagedKVCache (models/paged_cache.py):
- admission is by free blocks, not by slots × max_seq: a request reserves the blocks of its prompt and
  first generated token, minus the blocks of its prompt already cached, and waits (first in line)
  until they are free; later tokens take blocks as they come (a request without max_tokens no longer
  holds a whole context);
- preemption (vLLM's "recompute"): when the running requests' next tokens need more blocks than are
  free, the newest request is preempted: its blocks are freed (the full ones stay in the prefix cache)
  and it goes back to the front of the queue with its tokens so far; readmitted, it prefills
  prompt + generated tokens (mostly prefix hits) and goes on where it stopped, its next token already
  chosen, its sampler and detokenizer state kept, so its output is what it would have been;
- a request whose prompt starts with cached full blocks (same system prompt, same few-shot examples,
  the earlier turns of a chat) reads their KV and prefills only the rest;
- every block a sequence fills (prompt or generated) is offered to the prefix cache as it fills.

Exactness: a cached block holds the K/V the same tokens at the same positions produced, and a row's
keys are read in position order from its block table, so greedy outputs equal the static-slot path's
up to float rounding of a differently shaped prefill (tests/engine/test_paged.py checks them equal).
"""

from __future__ import annotations

import time
from collections import deque

import torch

from leanformer.engine.block_manager import BlockManager
from leanformer.engine.cache import plan_cache
from leanformer.engine.request import SeqState
from leanformer.engine.scheduler import Scheduler
from leanformer.engine.windowed import WindowScheduler, describe_window, window_scheduler
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.paged_cache import PagedKVCache


def plan_blocks(
    model,
    max_seq: int,
    block_size: int,
    kv_budget_mb: float | None,
    kv_blocks: int | None,
    max_batch: int,
) -> int:
    """→ how many KV blocks to allocate: `kv_blocks` if given, else as many as `kv_budget_mb` holds but
    no more than max_batch full-length sequences need (what static slots would have allocated)."""
    a = model.args
    max_seq = min(max_seq, a.max_position_embeddings)
    per_seq = -(-max_seq // block_size)
    if kv_blocks is not None:
        if kv_blocks < per_seq:
            raise LeanformerError(
                f"--kv-blocks {kv_blocks} cannot hold one sequence of {max_seq} tokens "
                f"({per_seq} blocks of {block_size}): raise --kv-blocks or lower --max-seq"
            )
        return kv_blocks
    # one block's bytes, from a cache of that shape on the meta device (follows int8 KV storage)
    param = next(p for p in model.parameters() if p.is_floating_point())
    storage = getattr(model, "kv_cache_dtype", None)
    one = PagedKVCache(
        a.num_hidden_layers,
        1,
        max_seq,
        a.num_key_value_heads,
        a.head_dim,
        1,
        block_size,
        param.dtype,
        "meta",
        storage,
    )
    per_block = one.block_nbytes()
    n = max_batch * per_seq
    if kv_budget_mb is not None:
        n = min(n, int(kv_budget_mb * 2**20 // per_block))
        if n < per_seq:
            raise LeanformerError(
                f"a KV budget of {kv_budget_mb:g} MB holds {n} blocks of {block_size} tokens, not one "
                f"sequence of {max_seq} ({per_seq} blocks, {per_seq * per_block / 2**20:.1f} MB): "
                "raise --kv-budget-mb or lower --max-seq"
            )
    return n


class PagedScheduler(Scheduler):
    """Scheduler whose KV memory is blocks of a PagedKVCache, with prefix caching unless turned off."""

    def __init__(
        self,
        model,
        tok,
        max_batch: int,
        max_seq: int,
        num_blocks: int,
        block_size: int = 16,
        prefix_caching: bool = True,
        prefill_chunk: int = 256,
        max_waiting: int = 256,
    ) -> None:
        if max_batch < 1:
            raise LeanformerError(f"--max-batch must be ≥ 1, got {max_batch}")
        cache = PagedKVCache.for_model(model, max_batch, max_seq, num_blocks, block_size)
        super().__init__(model, tok, max_batch, max_seq, prefill_chunk, max_waiting, cache=cache)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.preempted: deque[SeqState] = deque()  # readmitted before any waiting request
        self.preemptions_total = 0
        self._admitted = 0  # admission counter: the newest request is preempted first

    def check(self, req) -> None:
        super().check(req)
        need = len(req.prompt) + req.max_tokens
        if not self.blocks.fits_ever(need):
            bm = self.blocks
            raise LeanformerError(
                f"this server's KV cache holds {bm.num_blocks * bm.block_size} tokens, but the request "
                f"needs {need} ({len(req.prompt)} in the prompt + max_tokens {req.max_tokens}); "
                "shorten the prompt or lower max_tokens"
            )

    def _claim(self, seq: SeqState) -> bool:
        table = self.blocks.admit(seq.fill, len(seq.fill) + 1)
        if table is None:
            return False
        if getattr(seq, "order", None) is None:  # a readmitted request keeps its place
            seq.order = self._admitted
            self._admitted += 1
        seq.table = table
        n = len(table.blocks)
        if n:
            self.cache.block_tables[seq.slot, :n] = _tensor(table.blocks)
        seq.prefilled = n * self.blocks.block_size
        self.cache.lengths[seq.slot] = seq.prefilled
        return True

    def _grow(self, seqs: list[SeqState], lengths: list[int]) -> None:
        for s, n in zip(seqs, lengths):
            for i, block in self.blocks.grow(s.table, n):
                self.cache.block_tables[s.slot, i] = block

    def _computed(self, seqs: list[SeqState]) -> None:
        bs = self.blocks.block_size
        for s in seqs:
            n = int(self.cache.lengths[s.slot])
            if n // bs > s.table.registered:  # a block just filled: worth building the token list
                self.blocks.register(s.table, s.req.prompt + s.out, n)

    # ---- preemption ----
    def has_work(self) -> bool:
        return bool(self.preempted) or super().has_work()

    @property
    def n_waiting(self) -> int:
        return len(self.waiting) + len(self.preempted)

    def _need(self, s: SeqState, extra: int) -> int:
        """Blocks s must still take to hold `extra` more tokens (beyond what it holds or reserved)."""
        have = len(s.table.blocks) + s.table.reserved
        return max(0, self.blocks.blocks_for(int(self.cache.lengths[s.slot]) + extra) - have)

    def spare_blocks(self) -> int:
        """Free blocks left once every running request has room for its next token (for drafts)."""
        return self.blocks.spare - sum(self._need(s, 1) for s in self.running)

    def _decode(self) -> None:
        while self.running and self.spare_blocks() < 0:
            self._preempt(max(self.running + self.prefilling, key=lambda s: s.order))
        super()._decode()

    def _preempt(self, s: SeqState) -> None:
        """Free s's blocks and slot; it comes back first in line with prompt + its tokens to recompute."""
        (self.running if s in self.running else self.prefilling).remove(s)
        self._release(s)
        self.free.append(s.slot)
        s.fill = s.req.prompt + s.out[:-1] if s.out else s.req.prompt
        s.resumed, s.prefilled = bool(s.out), 0  # resumed: s.next_token (= out[-1]) is already chosen
        self.preempted.append(s)
        self.preemptions_total += 1

    def _admit(self) -> None:
        while self.preempted and self.free:
            self.free.sort()
            s = self.preempted[0]
            s.slot = self.free[0]
            self.cache.reset(_tensor([s.slot]))
            if not self._claim(s):
                return  # new requests wait behind the preempted ones
            self.preempted.popleft()
            self.free.pop(0)
            self.prefilling.append(s)
        if not self.preempted:
            super()._admit()

    def _retire_cancelled(self) -> None:
        super()._retire_cancelled()
        now = time.monotonic()
        for s in list(self.preempted):
            r = s.req
            why = "cancelled" if r.cancelled else None
            if why is None and r.timeout is not None and now - r.submitted > r.timeout:
                why = "timeout"
            if why:
                self.preempted.remove(s)
                self._emit_final(r, why, len(s.out))

    def abort_all(self, reason: str = "abort") -> None:
        while self.preempted:
            s = self.preempted.popleft()
            self._emit_final(s.req, reason, len(s.out))
        super().abort_all(reason)

    def _release(self, seq: SeqState) -> None:
        table = getattr(seq, "table", None)
        if table is not None:
            self.blocks.release(table)
            self.cache.reset(_tensor([seq.slot]))
            seq.table = None


def _tensor(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def build_scheduler(
    model, tok, kv_cache: str, max_batch: int, max_seq: int, kv_budget_mb: float | None,
    kv_blocks: int | None, block_size: int, prefix_caching: bool, prefill_chunk: int, max_waiting: int,
    kv_policy=None,
) -> Scheduler:  # fmt: skip
    """The server's scheduler: kv_cache "paged" (blocks, prefix caching) or "slots" (one static slot
    of max_seq tokens per request, as many as kv_budget_mb holds, the fused C++ decode step).
    kv_policy SinkWindow(...): sliding-window slots whatever kv_cache says (engine/windowed.py)."""
    if kv_policy is not None:
        sched = window_scheduler(
            model, tok, kv_policy, max_batch, max_seq, kv_budget_mb, prefill_chunk, max_waiting
        )
    elif kv_cache == "slots":
        n_slots, max_seq = plan_cache(model, max_batch, max_seq, kv_budget_mb)
        sched = Scheduler(model, tok, n_slots, max_seq, prefill_chunk, max_waiting)
    elif kv_cache == "paged":
        n_blocks = plan_blocks(model, max_seq, block_size, kv_budget_mb, kv_blocks, max_batch)
        sched = PagedScheduler(
            model, tok, max_batch, max_seq, n_blocks, block_size, prefix_caching, prefill_chunk, max_waiting
        )
    else:
        raise LeanformerError(f"unknown KV cache {kv_cache!r}: choose paged or slots")
    # decode forwards of ≤ MAX_ROWS rows stay on the fused C++ step: 32 rows as 2 × 16 measured 1.08×
    # (paged) / 1.16× (slots) the tok/s of one 32-row module-path forward on SmolLM2 (BENCHMARKS.md)
    sched.decode_rows = MAX_ROWS
    return sched


def describe(s: Scheduler) -> str:
    """One line for the server's start-up: what the KV cache holds."""
    if isinstance(s, WindowScheduler):
        return describe_window(s)
    mb = s.cache.nbytes() / 2**20
    if not isinstance(s, PagedScheduler):
        return f"KV cache: {s.cache.n_slots} slots × {s.max_seq} tokens = {mb:.0f} MB"
    c, prefix = s.cache, "on" if s.blocks.prefix_caching else "off"
    return (
        f"KV cache: {c.num_blocks} blocks × {c.block_size} tokens = {mb:.1f} MB (paged), up to "
        f"{c.n_slots} requests of ≤ {s.max_seq} tokens, prefix caching {prefix}"
    )
