"""Prompt-lookup speculation for a batch of prompts in lf.generate: every row drafts on its own, all
rows' [next token, draft 1..k_r] are verified in ONE forward, and each row keeps its own accepted count.

The forward's rows are one-token rows: row r's k_r + 1 rows sit in r's cache slot at positions
length_r .. length_r + k_r, each attending to keys 0..its position (ChainRows: KVCache.chain for many
slots at once), so the batch runs the fused C++ decode step as long as it has at most MAX_ROWS rows in
all. A rejected draft is rolled back by the slot's length moving only by 1 + accepted: rows of
different acceptance keep their own lengths. Greedy only (the output must be plain batched greedy
decoding's: each row's drafts are kept while they equal the target's argmax, with speculative.py's tie
guard); sampling or a repetition penalty decodes plainly.

How many drafts each row gets: speculative.Controller measures the batch's plain step and the extra
seconds per verified draft row; draft survival is kept per (row, n-gram length). Drafts are handed out
one at a time to the row whose next draft is likeliest to survive, while the expected tokens per
second of the whole forward still grow; none at all (a plain batched step) when no draft pays.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from leanformer.engine.sampling import SamplingParams, greedy_tokens
from leanformer.engine.speculative import Controller, NgramIndex, PromptLookup, greedy_accept, tie_margin
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.kv_cache import KVCache, Step


class ChainRows:
    """The cache as seen by a forward over input_ids [T, 1] whose rows are, slot after slot, the next
    tokens of the slots in `slots` (one entry per row; a slot's rows consecutive): row t sits at its
    slot's length + (its index within that slot's run) and attends to keys 0..that position."""

    def __init__(self, cache: KVCache, slots: list[int]) -> None:
        self._cache, self._slots = cache, slots

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        if n_new != 1 or len(slots) != len(self._slots):
            raise LeanformerError("chained rows take one token per row (input_ids [T, 1], T = len(slots))")
        c = self._cache
        offsets, prev, j = [], None, 0
        for s in self._slots:
            j = j + 1 if s == prev else 0
            prev = s
            offsets.append(j)
        slot_ids = torch.tensor(self._slots)
        positions = (c.lengths[slot_ids] + torch.tensor(offsets))[:, None]  # [T, 1]
        key_len = int(positions.max()) + 1
        if key_len > c.max_seq:
            raise LeanformerError(f"sequence of {key_len} tokens exceeds the cache/context size {c.max_seq}")
        device = c.k[0].device
        mask = torch.arange(key_len)[None, None, None, :] <= positions[:, None, :, None]  # [T, 1, 1, S]
        return Step(slot_ids.to(device), positions.to(device), key_len, mask.to(device), False, None)


def supports(spec, n_prompts: int, params: SamplingParams) -> bool:
    """Whether a batch decodes with speculative_rows (else plainly)."""
    return (
        isinstance(spec, PromptLookup)
        and n_prompts > 1
        and params.greedy
        and params.repetition_penalty == 1.0
    )


def _allocate(control: Controller, found: dict[int, tuple[list[int], int]], n_rows: int) -> dict[int, int]:
    """Drafts per row: one at a time to the row whose next draft is likeliest kept, while the forward's
    expected tokens per second grow and the rows fit the fused step (MAX_ROWS)."""
    take = dict.fromkeys(found, 0)
    if control.plain_s is None or control.plain_steps < control.PROBE or not found:
        return take
    if control.row_s is None:  # measure what a verified row costs: 2 drafts for one row
        r = next(iter(found))
        take[r] = min(2, len(found[r][0]), MAX_ROWS - n_rows)
        return take
    tokens, cost = float(n_rows), control.plain_s
    for _ in range(MAX_ROWS - n_rows):
        gains = {
            r: control.alpha_of((r, n)) ** (take[r] + 1)
            for r, (drafts, n) in found.items()
            if take[r] < min(len(drafts), control.max_draft)
        }
        if not gains:
            break
        r = max(gains, key=gains.get)
        if (tokens + gains[r]) / (cost + control.row_s) <= tokens / cost:
            break
        take[r] += 1
        tokens, cost = tokens + gains[r], cost + control.row_s
    return take


@torch.inference_mode()
def speculative_rows(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    spec: PromptLookup,
    stop_ids: set[int],
    stats=None,
) -> Iterator[dict[int, int]]:
    """Yield {row: token} dicts, as decode() does: a round's accepted tokens come out one dict per
    position, each naming the rows that have a token there."""
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    cache = KVCache.for_model(model, n, longest + max_new_tokens)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(n, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, slots=torch.arange(n), logits_at=lengths - 1)[:, -1].float()
    cache.set_length(torch.arange(n), lengths)
    first = greedy_tokens(logits).tolist()
    if stats is not None:
        stats.prompt_tokens += int(lengths.sum())
        stats.prefill_s += time.perf_counter() - t0
        stats.first_token_s = time.perf_counter() - t0
        stats.per_row = [0] * n
    index = [NgramIndex(spec.ngram, spec.min_ngram) for _ in prompts]
    made = [0] * n  # new tokens per row
    control = Controller(spec.max_draft)
    margin = tie_margin(model)
    emitted = {r: [first[r]] for r in range(n)}
    recheck: set[int] = set()  # rows whose last verification ended on a near tie
    running = list(range(n))
    for r, p in enumerate(prompts):
        index[r].extend(p)
    while True:
        for r in running:  # cut at a stop token or the budget
            out = emitted[r]
            for j, t in enumerate(out):
                if t in stop_ids or made[r] + j + 1 >= max_new_tokens:
                    emitted[r] = out[: j + 1]
                    break
            index[r].extend(emitted[r])
        for j in range(max((len(emitted[r]) for r in running), default=0)):
            step = {r: emitted[r][j] for r in running if j < len(emitted[r])}
            if stats is not None:
                stats.new_tokens += len(step)
                for r in step:
                    stats.per_row[r] += 1
            yield step
        for r in running:
            made[r] += len(emitted[r])
        running = [
            r for r in running if made[r] < max_new_tokens and not (emitted[r] and emitted[r][-1] in stop_ids)
        ]
        if not running:
            return
        t1 = time.perf_counter()
        found = {}
        for r in running:
            drafts, key = index[r].propose(spec.max_draft)
            room = max_new_tokens - made[r] - 1
            if drafts and room > 0 and r not in recheck:
                found[r] = (drafts[:room], key)
        take = _allocate(control, found, len(running))
        slots, tokens = [], []
        for r in running:
            k = take.get(r, 0)
            slots += [r] * (k + 1)
            tokens += [index[r].seq[-1], *found[r][0][:k]] if k else [index[r].seq[-1]]
        recheck = set()
        if len(slots) == len(running):  # a plain batched step
            rows = torch.tensor(running)
            logits = model(torch.tensor(tokens)[:, None], cache=cache, slots=rows)[:, -1].float()
            cache.advance(rows, 1)
            best = greedy_tokens(logits).tolist()
            emitted = {r: [best[i]] for i, r in enumerate(running)}
            control.plain(time.perf_counter() - t1)
            for r in found:  # would lookup have guessed it? (free to know)
                control.observe(int(found[r][0][0] == emitted[r][0]), 1, (r, found[r][1]))
        else:
            view = ChainRows(cache, slots)
            logits = model(torch.tensor(tokens)[:, None], cache=view, slots=torch.tensor(slots))[
                :, -1
            ].float()
            emitted, at, drafted, kept = {}, 0, 0, 0
            for r in running:
                k = take.get(r, 0)
                drafts = found[r][0][:k] if k else []
                accepted, nxt = greedy_accept(logits[at : at + k + 1], drafts, margin)
                at += k + 1
                cache.advance(torch.tensor([r]), accepted + (nxt is not None))
                emitted[r] = drafts[:accepted] + ([] if nxt is None else [nxt])
                if nxt is None:
                    recheck.add(r)
                if k:
                    control.observe(accepted, accepted + (accepted < k), (r, found[r][1]))
                drafted, kept = drafted + k, kept + accepted
            control.round(drafted, 0, time.perf_counter() - t1, None)  # timing only (counts above)
            if stats is not None:
                stats.drafted += drafted
                stats.accepted += kept
                stats.spec_rounds += 1
        if stats is not None:
            stats.decode_s += time.perf_counter() - t1
            stats.steps += 1
            stats.fallbacks = control.fallbacks
