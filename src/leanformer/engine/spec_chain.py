"""The server's verification forwards: chained rows of several requests in one decode forward (Chain),
and what such a forward costs per row count (batch_costs, timed once per model and setting).

engine/spec_batch.py runs B requests with k_i drafts each as ONE forward of B + sum(k_i) one-token rows;
its draft policy (engine/spec_batch_policy.py) prices a draft by what the extra rows add to that forward.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.kv_cache import KVCache, Step
from leanformer.models.paged_cache import PagedKVCache, PagedStep

ROW_FLOOR = 0.05  # the least one more chained row is taken to cost, in one-row steps


class Chain:
    """A cache seen by a forward of one-token rows where row r is the token at position positions[r] of
    slot slots[r] (several rows may chain in one slot). Everything but begin() is the cache's."""

    fused_layout = True  # one token per row: the fused step's layout, whatever the cache's last step was

    def __init__(
        self, cache, slots: list[int], positions: list[int], max_fused_rows: int = MAX_ROWS,
        logit_rows: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """max_fused_rows: rows up to which the fused step takes this forward (models/fused.py; more for a
        prefill, whose int4 Linears then take the GEMM); logit_rows: the fused step returns only these
        rows' logits (a prefill's last tokens: engine/prefill.py), [len(logit_rows), 1, V]."""
        self._cache = cache
        self._slots, self._pos = torch.tensor(slots), torch.tensor(positions)
        self.max_fused_rows, self.logit_rows = max_fused_rows, logit_rows

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        if n_new != 1:
            raise LeanformerError("a chained cache step takes one token per row (input_ids [R, 1])")
        c, rows = self._cache, len(self._slots)
        key_len = int(self._pos.max()) + 1
        if key_len > c.max_seq:
            raise LeanformerError(f"sequence of {key_len} tokens exceeds the cache/context size {c.max_seq}")
        positions = self._pos[:, None]  # [R, 1]
        mask = torch.arange(key_len)[None, None, None, :] <= positions[:, None, :, None]  # [R, 1, 1, S]
        if not isinstance(c, PagedKVCache):
            dev = c.k[0].device
            return Step(self._slots.to(dev), positions.to(dev), key_len, mask.to(dev), False, None)
        # paged: each row reads its sequence's blocks and writes its own position there, so the rows of
        # a chain see each other's new K/V (every row writes before any attends)
        tables = c.block_tables[self._slots]  # [R, max_blocks]
        write = c._rows(tables, positions)  # [R, n_kv, 1]
        read = c._rows(tables, torch.arange(key_len).expand(rows, key_len))  # [R, n_kv, S]
        dev = c.device
        step = PagedStep(
            torch.arange(rows, device=dev), positions.to(dev), key_len, mask.to(dev), False, None,
            write_rows=write.reshape(-1).to(dev), read_rows=read.reshape(-1).to(dev),
        )  # fmt: skip
        c._step = step
        return step


def _line(points: dict[int, float], top: int, first: int, floor: float, smooth: bool = True) -> list[float]:
    """Costs at 1..top: 1.0 at one row; from m = first on, the larger of a least-squares line a + b·m
    through the timed medians (slope at least `floor`) and the medians themselves (linear between the
    timed counts), each row adding at least max(floor, half the slope). The line keeps one count's dip
    from making a draft look free (on a shared machine a median can still be off by 30%: under load 5
    three chained-row counts timed alike, 2.06); the medians keep the line from pricing the first rows
    below what they were timed at (2 rows: the line said 1.00, the timing 1.3). Both err towards dear.
    smooth=False: the medians alone, non-decreasing (plain steps: there a dip errs towards not drafting)."""
    pts = sorted((m, c) for m, c in points.items() if m >= first)
    if not pts:
        return [1.0 + floor * m for m in range(top)]
    mx = sum(m for m, _ in pts) / len(pts)
    my = sum(c for _, c in pts) / len(pts)
    var = sum((m - mx) ** 2 for m, _ in pts)
    b = max(floor, sum((m - mx) * (c - my) for m, c in pts) / var) if var > 0 else floor
    if not smooth:
        mx, my, b, floor = 0.0, 0.0, 0.0, 0.0
    out, best = [1.0], 1.0
    for m in range(2, top + 1):
        c = my + b * (m - mx)
        lo = [p for p in pts if p[0] <= m]
        hi = [p for p in pts if p[0] >= m]
        if lo and hi:  # within the timed counts: the medians, interpolated
            (m0, c0), (m1, c1) = lo[-1], hi[0]
            c = max(c, c0 if m1 == m0 else c0 + (c1 - c0) * (m - m0) / (m1 - m0))
        best = max(c, best + max(floor, b / 2))  # no one row cheaper than half the line's slope
        out.append(best)
    return out[:top]


def _layout(rows: int, slots: int, context: int) -> tuple[list[int], list[int]]:
    """`rows` chained rows over min(rows, slots) slots, as even as can be: (slot, position) per row."""
    s = min(rows, slots)
    per = [rows // s + (i < rows % s) for i in range(s)]
    slot_of = [i for i in range(s) for _ in range(per[i])]
    pos = [context + j for i in range(s) for j in range(per[i])]
    return slot_of, pos


@torch.inference_mode()
def batch_costs(
    model: nn.Module, slots: int, rows: int, repeats: int = 8, context: int = 128
) -> tuple[list[float], list[float]]:
    """(plain, chained): what a decode forward costs, in one-row plain steps of the same pass.

    plain[b - 1]: b requests, one row each, through the plain decode path (b = 1..slots).
    chained[r - 1]: r rows through Chain, spread over min(r, slots) requests (r = 1..rows), the path
    a verification forward takes. Timed once per model, activation and KV setting (kept
    on the model): `repeats` passes after a warm-up pass (it builds the fused decode stacks), each
    count's cost the median over passes of its time over the same pass's one-row time; then a line
    through those medians (_line). Timed on ONE thread by its CPU time (time.thread_time): wall-clock
    ratios of a 2-thread server under load 5-8 swung from "rows are free" to "dear" between server
    starts (bench-serve drafted 474 tokens in one run, 4,770 at 39% acceptance in the next), while a
    thread's CPU time barely sees the other processes. One thread also errs towards dear rows: a
    second thread speeds the compute-bound multi-row forwards up more than the one-row step.
    ~9 s for SmolLM2 at 4 slots and 16 rows. The scratch cache's keys are zeros at
    positions 0..context; it is freed on return."""
    key = (
        getattr(model, "decode_activations", "auto"),
        getattr(model, "kv_cache_dtype", None),
        getattr(model, "fused_decode", None),
        slots,
        rows,
    )
    known = model.__dict__.setdefault("_batch_costs", {})
    if key in known:
        return known[key]
    slots = max(1, min(slots, rows))
    cache = KVCache.for_model(model, slots, context + rows + 1)
    context = max(0, min(context, cache.max_seq - rows - 1))
    plain_counts = sorted({m for m in (1, 2, 3, 4, 6, 8, 12, 16) if m <= slots} | {slots})
    # every count up to 10: a forward of 9 rows runs the GEMVs as 8 rows + 1 (gemv_i8_impl.h rows), a
    # step up in cost (SmolLM2 int4 in the server: 8 chained rows 1.41x a plain 4-row step, 9 rows
    # 1.92x) that a line through 8 and 12 hid, so 9-12-row forwards were chosen at a loss
    chain_counts = sorted({m for m in (*range(2, 11), 12, 16) if m <= rows} | {rows} - {1})
    ratios: dict[tuple[str, int], list[float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every kernel runs on this thread, so its CPU time is the forward's work
    try:
        for rep in range(repeats + 1):
            seconds: dict[tuple[str, int], float] = {}
            for m in plain_counts:
                ids = torch.arange(m)
                cache.set_length(ids, torch.full((m,), context))
                t = time.thread_time()
                model(torch.zeros(m, 1, dtype=torch.long), cache=cache, slots=ids)
                seconds["plain", m] = time.thread_time() - t
            for m in chain_counts:
                slot_of, pos = _layout(m, slots, context)
                cache.set_length(torch.arange(slots), torch.full((slots,), context))
                chain, ids = Chain(cache, slot_of, pos), torch.zeros(m, 1, dtype=torch.long)
                t = time.thread_time()
                model(ids, cache=chain, slots=torch.arange(m))
                seconds["chain", m] = time.thread_time() - t
            if rep > 0:  # the first pass builds the fused decode stacks
                for k, sec in seconds.items():
                    ratios.setdefault(k, []).append(sec / seconds["plain", 1])
    finally:
        torch.set_num_threads(threads)
    ratio = {k: statistics.median(r) for k, r in ratios.items()}
    plain = _line({m: ratio["plain", m] for m in plain_counts}, slots, 1, 0.0, smooth=False)
    chained = _line({m: ratio["chain", m] for m in chain_counts}, rows, 2, ROW_FLOOR)
    known[key] = (plain, chained)
    return plain, chained
