"""How many drafts each request of a continuous batch verifies in the next decode forward.

A batch of B running requests takes one decode forward per step. Giving request i k_i drafts turns it
into one forward of B + K rows (K = sum k_i): it costs chained(B + K) instead of plain(B) (both in
one-row plain steps, engine/spec_chain.batch_costs, timed once per model) and everyone waits for it,
while it yields B + sum_i E_i(k_i) tokens, E_i(k) = sum_{j=1..k} P(request i's first j drafts all
survive). So drafts are chosen for the whole batch's output tokens per second:

    rate(K) = (B + sum of the K largest draft survival chances) / chained(B + K),  rate(0) = B / plain(B).

A request's j-th draft can only survive after its (j-1)-th, so its chances fall along its drafts and the
K largest chances over all requests are always a prefix of each request's drafts: a greedy pass (best
next draft of any request, by a heap) gives the best set for every K at once, and the best K wins
(allocate). A draft's chance comes from spec_policy.LookupPolicy: survival per length of the suffix
match it continues (ngram.SuffixIndex, kept per request and extended with each new token), learnt per
request. A request whose drafts do not pay gets none (a plain row in the forward) and keeps learning for
free: after a plain step it checks whether lookup's guess was the token chosen (RequestDrafts.settle).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from leanformer.engine.ngram import SuffixIndex
from leanformer.engine.spec_policy import LOOKUP_PRIOR, LookupPolicy


def _cost(costs: list[float], n: int) -> float:
    """costs[n - 1], extended linearly past the end (more rows than were timed)."""
    if n <= len(costs):
        return costs[n - 1]
    step = costs[-1] - costs[-2] if len(costs) > 1 else costs[-1]
    return costs[-1] + step * (n - len(costs))


def allocate(
    offers: list[list[float]], plain: list[float], chained: list[float], room: int, margin: float = 0.0
) -> list[int]:
    """Drafts per request for one forward (module docstring).

    offers[i]: request i's drafts' survival chances in order, non-increasing (the chance that drafts
    1..j all survive); B = len(offers); at most `room` drafts in all. K > 0 must beat a plain step's
    rate by `margin` (a share), so a draft that only breaks even is not worth the risk of its estimate."""
    b = len(offers)
    if b == 0:
        return []
    heap = [(-o[0], i, 0) for i, o in enumerate(offers) if o]
    heapq.heapify(heap)
    best, best_k = b / _cost(plain, b) * (1 + margin), 0
    tokens, picks = float(b), []
    while heap and len(picks) < room:
        chance, i, j = heapq.heappop(heap)
        tokens -= chance
        picks.append(i)
        if j + 1 < len(offers[i]):
            heapq.heappush(heap, (-offers[i][j + 1], i, j + 1))
        rate = tokens / _cost(chained, b + len(picks))
        if rate > best:
            best, best_k = rate, len(picks)
    counts = [0] * b
    for i in picks[:best_k]:
        counts[i] += 1
    return counts


class RequestDrafts:
    """One request's prompt-lookup state in the server: its suffix index (fed with each new token, never
    rebuilt), draft survival per match length, and the pending free check of a plain step."""

    def __init__(self, max_draft: int, ngram: int, min_ngram: int) -> None:
        self.index = SuffixIndex(ngram, min_ngram)
        # its survival counts only (costs are the batch's), from the per-match-length prior
        self.policy = LookupPolicy(max_draft, [1.0], LOOKUP_PRIOR)
        self.max_draft = max_draft
        self.fed = 0  # tokens of prompt + out in the index
        self.found: list[int] = []  # this step's lookup drafts (up to the limit)
        self.match = 0  # the length of the suffix match they continue
        self.pending: tuple[int, int, int] | None = None  # (match, guessed token, len(out) then)
        self.drafting = False
        # Backing off while nothing is drafted: after 4k steps in a row without drafts, k lookups are
        # skipped between two (k <= 3). A lookup and its pricing cost ~30 µs per request and step on
        # the engine thread, ~1.3% of a 4-stream step for open-ended text that never drafts; a copy
        # from the prompt is still found within 4 steps of its start.
        self.misses = 0  # steps in a row without drafts
        self.skip = 0  # lookups still to skip
        self.looked = False  # this step's offer looked up

    def settle(self, out: list[int]) -> None:
        """The last step was plain while lookup had a guess: was it the token chosen? (free to know)"""
        if self.pending is not None:
            match, guess, n = self.pending
            if len(out) > n:
                self.policy.observe(match, out[n] == guess)
            self.pending = None

    def offer(self, prompt: list[int], out: list[int], limit: int | Callable[[], int]) -> list[float]:
        """Look up drafts (≤ limit; a callable is asked only when this step looks up) for the text so
        far → their survival chances (see allocate)."""
        self.settle(out)
        self.looked = self.skip == 0 and (limit := limit() if callable(limit) else limit) >= 1
        if not self.looked:
            self.skip = max(0, self.skip - 1)
            self.found, self.match = [], 0
            return []
        # the index is fed only when it is asked: a request backing off skips the calls, not the tokens
        total = len(prompt) + len(out)
        if self.fed < len(prompt):
            self.index.extend(prompt[self.fed :])
            self.fed = len(prompt)
        if self.fed < total:
            self.index.extend(out[self.fed - len(prompt) :])
            self.fed = total
        self.found, self.match = self.index.propose_longest(min(limit, self.max_draft))
        chances, p = [], 1.0
        for j in range(len(self.found)):
            p *= self.policy.alpha(self.match + j)
            chances.append(p)
        return chances

    def chosen(self, k: int, out: list[int]) -> tuple[list[int], bool]:
        """k drafts were allocated → (the drafts, whether drafting just stopped for this request)."""
        if k == 0 and self.found:
            self.pending = (self.match, self.found[0], len(out))
        stopped = self.drafting and k == 0 and bool(self.found)
        if self.found:
            self.drafting = k > 0
        self.misses = 0 if k > 0 else self.misses + 1
        if self.looked:
            self.skip = min(self.misses // 4, 3)
        return self.found[:k], stopped

    def verified(self, k: int, accepted: int) -> None:
        """A verification of k drafts kept `accepted` of them."""
        self.policy.round(self.match, k, accepted)
