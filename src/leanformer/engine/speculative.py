"""Speculative decoding for one sequence: propose k tokens cheaply, check them in ONE target forward.

Proposers: prompt lookup (the continuation of the longest recent earlier occurrence of the text's
last tokens in prompt + text so far; no second model) and a draft model (any loaded model with the
target's vocabulary, e.g. the int4 version of the target). Verification feeds [last token, draft 1..k]
as k+1 one-token rows of one cache slot (KVCache.chain): the target runs its plain decode kernels (fused
C++ step, M-row GEMV) over all of them at once. Rejected drafts are rolled back by setting the slot's
length back (no copy).

Greedy: a draft is kept while it equals the target's argmax. The int8-activation GEMV (the fused step's
default on AVX2) is batch-invariant, so the output is plain decoding's token for token; on fp32
activations an M-row GEMV sums in another order (~1e-4 on SmolLM2's logits), and a row whose top two
are closer than TIE_MARGIN is recomputed by a one-row step.
Sampling: the standard rejection scheme (accept with min(1, p/q), else resample from norm(max(0, p-q)));
prompt lookup's q is a point mass. The output distribution is the target's; the random stream is not
plain decoding's, so a seed reproduces speculative runs, not plain ones.

Never slower: prompt lookup's draft length comes from spec_policy.LookupPolicy: verification costs per
row count timed once per model (verify_costs), draft survival learnt on the request per length of the
suffix match a draft continues; k = 0 (a plain step) whenever no draft length is expected to beat
it. A draft model's comes from spec_policy.DraftPolicy: the same verification costs and the draft's
own cost (draft_cost, timed once per model), survival learnt on the request, one-draft probes after
plain steps spaced so that rejected ones cost at most ~1.5% (plain steps in this loop run the plain
loop's own code: one forward, one argmax).

Verification path (profiled on SmolLM2 Q4_1 kept int4, 1 thread, AVX2): the fused C++ step on k+1
chained rows is the cheapest there is: 1.35x a one-row step at 2 rows, 1.64x at 3, 2.5x at 5, 4.7x at
9 (the int4 GEMV with int8 activations is compute-bound past one row; the int8 head 1.3x at 5 rows).
The module path at the same rows costs ~5x more, and a prefill-style [1, k+1] forward (dequantize then
GEMM past 16 rows) ~12x: neither pays.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from leanformer.engine.ngram import NgramIndex, SuffixIndex, lookup  # noqa: F401 (lookup: engine/spec_batch.py imports it here)
from leanformer.engine.sampling import SamplingParams, greedy_tokens, probabilities, sample
from leanformer.engine.spec_policy import (
    LOOKUP_PRIOR,
    Controller,  # noqa: F401 (spec_rows.py imports it here)
    DraftPolicy,
    LookupPolicy,
    draft_cost,
    verify_costs,
)
from leanformer.engine.verify import TIE_MARGIN, greedy_accept, tie_margin, verify  # noqa: F401 (re-exported)
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import MAX_ROWS
from leanformer.models.kv_cache import KVCache

MAX_DRAFT = MAX_ROWS - 1  # last token + drafts stay within the rows the decode kernels take at once
# A draft model of its own catches up on the tokens it has not seen (2 after a round that kept every
# draft, more after plain steps) as chained decode rows up to this many: a [1, n] forward would take the
# prefill path (int4: dequantize + GEMM, ~10x a decode step); past it, the prefill's fixed cost is shared
CATCH_UP_ROWS = 8


def _check_draft(max_draft: int) -> None:
    if isinstance(max_draft, bool) or not isinstance(max_draft, int) or not 1 <= max_draft <= MAX_DRAFT:
        raise LeanformerError(f"max_draft must be an integer in 1..{MAX_DRAFT}, got {max_draft!r}")


@dataclass(frozen=True)
class PromptLookup:
    """Draft by n-gram lookup: match the last `ngram` (down to `min_ngram`) tokens earlier in the text."""

    max_draft: int = 8
    ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        _check_draft(self.max_draft)
        if not (
            isinstance(self.ngram, int)
            and isinstance(self.min_ngram, int)
            and 1 <= self.min_ngram <= self.ngram
        ):
            raise LeanformerError(
                f"need 1 <= min_ngram <= ngram, got min_ngram={self.min_ngram!r}, ngram={self.ngram!r}"
            )


@dataclass(frozen=True, eq=False)
class DraftModel:
    """Draft with a smaller / cheaper model that shares the target's vocabulary."""

    model: nn.Module
    max_draft: int = 4

    def __post_init__(self) -> None:
        _check_draft(self.max_draft)
        if not hasattr(getattr(self.model, "args", None), "vocab_size"):
            raise LeanformerError("DraftModel needs a loaded decoder model (lf.load(...)[0])")


@dataclass(frozen=True)
class LayerSkip:
    """Self-speculation: the target's first `layers` blocks + its final norm and head draft (no second
    model, no extra weights; the draft keeps only its own small KV cache). A model not trained for early
    exit drafts less well than a real small model, so the cost model often falls back to plain steps."""

    layers: int
    max_draft: int = 4

    def __post_init__(self) -> None:
        _check_draft(self.max_draft)
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise LeanformerError(f"LayerSkip: layers must be a positive integer, got {self.layers!r}")


Speculative = PromptLookup | DraftModel | LayerSkip


def early_exit(model: nn.Module, n_layers: int) -> nn.Module:
    """A view of a Llama-family `model` running only its first n_layers blocks, sharing every weight
    (embeddings, blocks, norm, head): the module tables are copied, the parameters are not."""
    backbone = getattr(model, "model", None)
    if not isinstance(getattr(backbone, "layers", None), nn.ModuleList) or not hasattr(backbone, "norm"):
        raise LeanformerError("LayerSkip works on Llama-family decoders (Llama, Qwen2, Mistral, SmolLM)")
    total = len(backbone.layers)
    if not 1 <= n_layers < total:
        raise LeanformerError(f"LayerSkip: layers must be in 1..{total - 1} for this {total}-layer model")
    view = copy.copy(backbone)
    view._modules = dict(backbone._modules)
    view.layers = nn.ModuleList(list(backbone.layers)[:n_layers])
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.model = view
    draft.args = dataclasses.replace(model.args, num_hidden_layers=n_layers)
    draft.early_exit_layers = n_layers  # speculative decoding shares the target's cache for these
    if hasattr(model, "_decode_plan"):
        draft._decode_plan = type(model._decode_plan)()  # its own fused stack over the first n blocks
    return draft


def _early_exit_view(model: nn.Module, n_layers: int) -> nn.Module:
    """early_exit(model, n_layers), kept on the model: the view's fused decode stack is built once per
    model, not once per request (~0.35 of a step on SmolLM2), and draft_cost times it once. A kept view
    whose modules are no longer the model's (a Linear swapped since) is built again."""
    views = model.__dict__.setdefault("_early_exit_views", {})
    view = views.get(n_layers)
    ours, theirs = getattr(view, "_modules", {}), model._modules
    if view is not None and all(ours.get(k) is v for k, v in theirs.items() if k != "model"):
        inner, backbone = view.model, model.model
        same = all(inner._modules.get(k) is v for k, v in backbone._modules.items() if k != "layers")
        if (
            same
            and len(inner.layers) < len(backbone.layers)
            and all(a is b for a, b in zip(inner.layers, backbone.layers))
        ):
            return view
    views[n_layers] = early_exit(model, n_layers)
    return views[n_layers]


def resolve_speculative(spec: Speculative | str | None, model: nn.Module) -> Speculative | None:
    """`speculative=` argument → a config, checked against the target before any work."""
    if spec is None or isinstance(spec, PromptLookup):
        return spec
    if isinstance(spec, LayerSkip):
        return DraftModel(_early_exit_view(model, spec.layers), spec.max_draft)
    if isinstance(spec, str):
        if spec == "prompt-lookup":
            return PromptLookup()
        if spec.startswith("layer-skip:") and spec[len("layer-skip:") :].isdigit():
            return resolve_speculative(LayerSkip(int(spec[len("layer-skip:") :])), model)
        raise LeanformerError(
            f"unknown speculative method {spec!r}; use 'prompt-lookup', 'layer-skip:N', PromptLookup(...), DraftModel(...) or LayerSkip(...)"
        )
    if isinstance(spec, DraftModel):
        ours, theirs = model.args.vocab_size, spec.model.args.vocab_size
        if ours != theirs:
            raise LeanformerError(
                f"the draft model's vocabulary ({theirs}) differs from the target's ({ours})"
            )
        return spec
    raise LeanformerError(
        f"speculative must be 'prompt-lookup', PromptLookup, DraftModel or LayerSkip, got {type(spec).__name__}"
    )


class _DraftRunner:
    """The draft model's cache; it holds seq[:length] and catches up before each proposal.

    A LayerSkip draft (early_exit's view of the target's first n blocks) shares the target's cache for
    those layers instead: whatever the target wrote there is what the draft would have computed (same
    blocks, same tokens), so it never prefills or catches up (a catch-up of many tokens runs the int4
    prefill path, ~10x a decode step per token batch); what it writes past the target's length (its
    drafts) is overwritten by the verification forward before the target reads it."""

    def __init__(self, draft: nn.Module, max_seq: int, target: nn.Module, target_cache: KVCache) -> None:
        self.model = draft
        n = getattr(draft, "early_exit_layers", 0)
        ours, theirs = getattr(draft.model, "layers", ()), getattr(target.model, "layers", ())
        self.shared = n > 0 and all(a is b for a, b in zip(ours, list(theirs)[:n])) and len(ours) == n
        if self.shared:
            self.target_cache = target_cache
            self.cache = copy.copy(target_cache)  # the first n layers' tensors, its own lengths
            self.cache.k, self.cache.v = target_cache.k[:n], target_cache.v[:n]
            self.cache.k_scale, self.cache.v_scale = target_cache.k_scale[:n], target_cache.v_scale[:n]
            self.cache.lengths = target_cache.lengths.clone()
        else:
            self.cache = KVCache.for_model(draft, 1, max_seq)
        self.length = 0

    def prefill(self, prompt: list[int]) -> None:
        """Run the prompt through a draft with its own cache (with the target's prefill, not in decode)."""
        if not self.shared:
            self.model(torch.tensor([prompt]), cache=self.cache, slots=torch.tensor([0]))
            self.cache.advance(torch.tensor([0]), len(prompt))
            self.length = len(prompt)

    def propose(
        self, seq: list[int], k: int, params: SamplingParams, gen
    ) -> tuple[list[int], torch.Tensor | None]:
        """k drafts and, when sampling, their distributions q [k, V]."""
        # 1 token, 2 after a round that accepted every draft, more after plain steps; a shared cache
        # holds all but the last token already (the target's own cache invariant)
        if self.shared:
            self.length = int(self.target_cache.lengths[0])
            self.cache.lengths[0] = self.length
        new = seq[self.length :]
        if 1 < len(new) <= CATCH_UP_ROWS:  # a few tokens behind: chained decode rows, not a prefill
            rows = torch.tensor(new)[:, None]  # [n, 1]: one chain in slot 0
            logits = self.model(
                rows, cache=self.cache.chain(0), slots=torch.zeros(len(new), dtype=torch.long)
            )
            logits = logits[-1:, -1]
        else:
            logits = self.model(torch.tensor([new]), cache=self.cache, slots=torch.tensor([0]))[:, -1]
        self.cache.advance(torch.tensor([0]), len(new))
        self.length = len(seq)
        drafts, qs = [], []
        for i in range(k):
            logits = logits.float()
            if params.greedy:
                token = int(greedy_tokens(logits)[0])
            else:
                q = probabilities(logits, params)
                token = int(torch.multinomial(q, 1, generator=gen)[0, 0])
                qs.append(q[0])
            drafts.append(token)
            if i < k - 1:
                logits = self.model(torch.tensor([[token]]), cache=self.cache, slots=torch.tensor([0]))[:, -1]
                self.cache.advance(torch.tensor([0]), 1)
        return drafts, (torch.stack(qs) if qs else None)

    def rollback(self, seq_len: int, k: int, accepted: int) -> None:
        """After a round from a seq of seq_len tokens: the cache holds seq + drafts 1..k-1; keep the accepted."""
        if not self.shared:  # a shared cache re-reads the target's length at the next proposal
            self.length = seq_len + min(accepted, k - 1)
            self.cache.truncate(0, self.length)


@torch.inference_mode()
def speculative_decode(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    spec: Speculative,
    stop_ids: set[int],
    stats=None,
) -> Iterator[dict[int, int]]:
    """Yield {0: token} per new token of one prompt (checked by the caller), as decode() does.

    stats.decode_s grows after every step, so it is right however early the caller stops iterating."""
    cache = KVCache.for_model(model, 1, len(prompt) + max_new_tokens)
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    draft = isinstance(spec, DraftModel)
    runner = _DraftRunner(spec.model, len(prompt) + max_new_tokens, model, cache) if draft else None
    index = None if runner is not None else SuffixIndex(spec.ngram, spec.min_ngram)
    if index is not None:
        index.extend(prompt)  # drafts come from the prompt and the text so far
        # timed once per model and setting (spec_policy.verify_costs), outside this request's timings
        control = LookupPolicy(spec.max_draft, verify_costs(model, spec.max_draft + 1), LOOKUP_PRIOR)
    else:  # costs in one-row target steps, timed once per model (outside this request's timings)
        costs = verify_costs(model, spec.max_draft + 1)
        control = DraftPolicy(spec.max_draft, costs, draft_cost(model, spec.model))
    margin = tie_margin(model) if params.greedy else 0.0
    one = torch.tensor([0])
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt]), cache=cache)[:, -1].float()
    cache.advance(one, len(prompt))
    if runner is not None:
        runner.prefill(prompt)
    seq = list(prompt)
    token = int(sample(logits, params, gen, None)[0])
    if stats is not None:
        stats.prompt_tokens += len(prompt)
        stats.prefill_s += time.perf_counter() - t0
        stats.first_token_s = time.perf_counter() - t0
        stats.per_row = [0]
    emitted, recheck = [token], False
    while True:
        if index is not None:
            index.extend(emitted)
        for t in emitted:
            seq.append(t)
            if stats is not None:
                stats.new_tokens += 1
                stats.per_row[0] += 1
            yield {0: t}
            if t in stop_ids or len(seq) - len(prompt) >= max_new_tokens:
                return
        t1 = time.perf_counter()
        # drafts never run past max_new_tokens, so the cache sized for plain decoding holds them
        room = max_new_tokens - (len(seq) - len(prompt)) - 1
        drafts, q, key, found = [], None, None, []
        if recheck:  # the last verification ended on a near tie: one plain row decides it
            k = 0
        elif runner is not None:
            k = control.draft_len(room)
            if k > 0:
                drafts, q = runner.propose(seq, k, params, gen)
        else:
            found, key = index.propose_longest(spec.max_draft)  # key: the match's length
            k = control.draft_len(key, min(len(found), room)) if found else 0
            drafts = found[:k]
        recheck = False
        if not drafts:
            logits = model(torch.tensor([[seq[-1]]]), cache=cache, slots=one)[:, -1].float()
            cache.advance(one, 1)
            emitted = [int(sample(logits, params, gen, None)[0])]
            if found and params.greedy:  # would lookup have guessed it? (free to know)
                control.observe(key, found[0] == emitted[0])
        else:
            rows = torch.tensor([seq[-1], *drafts])[:, None]  # [k+1, 1]: one chain in slot 0
            logits = model(rows, cache=cache.chain(0), slots=torch.zeros(len(rows), dtype=torch.long))
            logits = logits[:, -1].float()
            if params.greedy:
                accepted, nxt = greedy_accept(logits, drafts, margin)
            else:
                accepted, nxt = verify(logits, drafts, q, params, gen)
            # the cache keeps the last token + accepted drafts (rejected ones lie past its length); a
            # near-tie row's token is not kept either: the next plain step feeds it again
            cache.advance(one, accepted + (nxt is not None))
            if runner is not None:
                runner.rollback(len(seq), len(drafts), accepted)
            emitted = drafts[:accepted] + ([] if nxt is None else [nxt])
            recheck = nxt is None
            if index is None:
                control.round(len(drafts), accepted)
            else:
                control.round(key, len(drafts), accepted)
            if stats is not None:
                stats.drafted += len(drafts)
                stats.accepted += accepted
                stats.spec_rounds += 1
        if stats is not None:
            stats.decode_s += time.perf_counter() - t1
            stats.steps += 1
            stats.fallbacks = control.fallbacks
