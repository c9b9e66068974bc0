"""Long-context quality and cost of KV policies (models/kv_policy.py): `leanformer eval --long`.

- stream_perplexity: a long text streamed through one cache in pieces of `piece` tokens (1: every
  token is a real decode step, the fused C++ step included), each piece scoring the next tokens;
  perplexity overall and over the first `fit` tokens (where full attention fits the context), RSS and
  decode tok/s at checkpoints. Memory is sampled from /proc (current RSS) and getrusage (peak).
- prompt_perplexity: blocks of `prompt_len` tokens compressed by an eviction policy, then the next
  `score_len` tokens scored through the compressed cache: ΔPPL next to the full cache on the same blocks.
- needle_rate: "The pass key is NNNNN" hidden at a random depth in filler text; greedy answer after
  "What is the pass key? The pass key is"; the share of trials that return the number.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from leanformer.engine.generate import generate
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache
from leanformer.models.kv_policy import Policy, PolicyCache, observe_queries

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class StreamResult:
    name: str
    tokens: int  # tokens scored
    perplexity: float
    fit_perplexity: float | None  # over the first `fit` tokens only
    cache_mb: float
    peak_rss_mb: float
    checkpoints: list[dict] = field(default_factory=list)  # {"position", "tok_s", "rss_mb"}

    def as_dict(self) -> dict:
        return asdict(self)


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _cache(model, policy: Policy | None, total: int, prompt_len: int):
    if policy is None:
        return KVCache.for_model(model, 1, total)
    return PolicyCache.for_model(model, 1, policy, total, prompt_len)


@torch.inference_mode()
def stream_perplexity(
    model,
    ids: list[int],
    policy: Policy | None,
    name: str,
    piece: int = 1,
    fit: int | None = None,
    checkpoints: tuple[int, ...] = (),
    progress: bool = True,
) -> StreamResult:
    """Score ids[1:] streaming ids through one cache (policy None: full attention, must fit the context)."""
    n = len(ids)
    if policy is None and n > model.args.max_position_embeddings:
        raise LeanformerError(f"full attention holds {model.args.max_position_embeddings} tokens, not {n}")
    cache = _cache(model, policy, n, 0)
    piece = min(piece, getattr(cache, "piece", piece))
    x = torch.tensor(ids)
    nll = torch.zeros(n - 1)
    times: list[tuple[int, float]] = []  # (position after the piece, seconds per token)
    marks: dict[int, float] = {}
    slots = torch.zeros(1, dtype=torch.long)
    bar = tqdm(total=n - 1, desc=name, unit="tok", disable=not progress)
    # the last 128 tokens before each checkpoint go one at a time: decode steps, timed (with piece > 1
    # the rest streams in pieces, which is faster and scores the same attention pattern)
    single = {p for c in checkpoints for p in range(max(0, c - 128), c)}
    with observe_queries(model, cache):
        lo = 0
        while lo < n - 1:
            hi = min(n - 1, lo + (1 if lo in single else piece))
            hi = min([hi] + [p for p in single if lo < p < hi])
            t0 = time.perf_counter()
            logits = model(x[None, lo:hi], cache=cache, slots=slots)[0].float()  # [T, V]
            cache.advance(slots, hi - lo)
            times.append((hi, (time.perf_counter() - t0) / (hi - lo)))
            nll[lo:hi] = -F.log_softmax(logits, -1).gather(-1, x[lo + 1 : hi + 1, None])[:, 0]
            for c in checkpoints:
                if lo < c <= hi:
                    marks[c] = rss_mb()
            bar.update(hi - lo)
            bar.set_postfix(ppl=f"{math.exp(nll[:hi].mean().item()):.2f}")
            lo = hi
    bar.close()
    fit_ppl = math.exp(nll[: fit - 1].mean().item()) if fit and fit <= n else None
    points = []
    for c, mem in sorted(marks.items()):
        near = [s for pos, s in times if c - 128 < pos <= c]  # the single steps before the checkpoint
        points.append({"position": c, "tok_s": 1 / statistics.median(near), "rss_mb": round(mem, 1)})
    return StreamResult(
        name, n - 1, math.exp(nll.mean().item()), fit_ppl, cache.nbytes() / 2**20, peak_rss_mb(), points
    )


@torch.inference_mode()
def prompt_perplexity(
    model, ids: list[int], policy: Policy | None, prompt_len: int, score_len: int, blocks: int, progress=True
) -> float:
    """Perplexity of the `score_len` tokens after each `prompt_len`-token prompt, the prompt compressed by
    `policy` (None: the full cache). Blocks are consecutive and independent."""
    size = prompt_len + score_len
    if len(ids) < size:
        raise LeanformerError(f"the text has {len(ids)} tokens; one block needs {size}")
    blocks = min(blocks, len(ids) // size)
    total, count = 0.0, 0
    slots = torch.zeros(1, dtype=torch.long)
    for b in tqdm(range(blocks), desc="prompt ppl", disable=not progress):
        x = torch.tensor(ids[b * size : (b + 1) * size])
        cache = _cache(model, policy, size, prompt_len)
        piece = getattr(cache, "piece", size)
        with observe_queries(model, cache):
            lo = 0
            while lo < size - 1:
                # the prompt in pieces the cache takes (logits of its last token only: [T, V] for a
                # 2k-token prompt is 400 MB), then the scored tokens (which may trigger eviction)
                in_prompt = lo < prompt_len
                hi = min(prompt_len if in_prompt else size - 1, lo + piece)
                at = torch.tensor([hi - lo - 1]) if in_prompt else None
                logits = model(x[None, lo:hi], cache=cache, slots=slots, logits_at=at)[0].float()
                cache.advance(slots, hi - lo)
                if hi >= prompt_len:
                    first = hi - 1 if in_prompt else lo  # logits here predict tokens first+1..hi
                    lp = F.log_softmax(logits, -1)
                    total -= lp.gather(-1, x[first + 1 : hi + 1, None]).sum().item()
                    count += hi - first
                lo = hi
    return math.exp(total / count)


def needle_prompt(tok, key: int, length: int, depth: float) -> list[int]:
    """~length tokens of filler with the pass key sentence at `depth` (0..1), then the question."""
    unit = list(tok.encode(FILLER, add_special_tokens=False))
    filler = (unit * (length // len(unit) + 1))[:length]
    cut = int(depth * len(filler))
    needle = list(
        tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    )
    question = list(tok.encode("\nWhat is the pass key? The pass key is", add_special_tokens=False))
    return filler[:cut] + needle + filler[cut:] + question


def needle_rate(
    model, tok, policy: Policy | None, trials: int, length: int, seed: int = 0, progress: bool = True
) -> float:
    """Share of `trials` pass keys retrieved greedily from ~length-token prompts (same keys and depths
    for every policy: the seed fixes them)."""
    if tok is None:
        raise LeanformerError("the needle test needs a tokenizer")
    rng = random.Random(seed)
    hits = 0
    for _ in tqdm(range(trials), desc="needles", disable=not progress):
        key, depth = rng.randint(10000, 99999), rng.uniform(0.1, 0.9)
        ids = needle_prompt(tok, key, length, depth)
        out = generate(model, tok, ids, max_new_tokens=8, ignore_eos=True, kv_policy=policy)
        hits += str(key) in tok.decode(out)
    return hits / trials


def _ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def run_window(model, ids: list[int], policy, piece: int, progress: bool = True) -> tuple[list, list, dict]:
    """`eval --long --window W`: the policy, the same window without sinks, and full attention over the
    part that fits the context → (summary rows, checkpoint rows, report)."""
    from leanformer.models.kv_policy import SinkWindow

    context = model.args.max_position_embeddings
    fit = min(context, len(ids))
    marks = tuple(c for c in (1000, 2000, 5000, 10000, 15000, 20000, 50000, 100000) if c < len(ids))
    # the policy first: getrusage's peak then is this run's own
    runs = [stream_perplexity(model, ids, policy, f"sinks {policy.sinks} + window {policy.window}", piece,
                              fit, marks, progress)]  # fmt: skip
    if policy.sinks:
        bare = SinkWindow(0, policy.window, policy.chunk)
        runs.append(
            stream_perplexity(model, ids, bare, f"window {policy.window}, no sinks", piece, fit, (), progress)
        )
    full = stream_perplexity(model, ids[:fit], None, "full attention", 256, fit, (), progress)
    runs.append(full)
    rows = [
        (r.name, str(r.tokens), _ppl(r.fit_perplexity), _ppl(r.perplexity if r is not full else None),
         f"{r.cache_mb:.1f}")
        for r in runs
    ]  # fmt: skip
    points = [(str(c["position"]), f"{c['tok_s']:.1f}", f"{c['rss_mb']:.0f}") for c in runs[0].checkpoints]
    report = {"fit_tokens": fit, "piece": piece, "runs": [r.as_dict() for r in runs]}
    return rows, points, report


def run_eviction(
    model,
    tok,
    ids: list[int],
    policies: dict,
    prompt_len: int,
    score_len: int,
    blocks: int,
    needles: int,
    progress: bool = True,
) -> tuple[list, dict]:
    """`eval --long --kv-budget B`: prompt perplexity and needle retrieval, full cache vs each policy."""
    rows, report = [], {"prompt_len": prompt_len, "score_len": score_len, "blocks": blocks, "runs": {}}
    full_ppl = None
    for name, policy in {"full cache": None, **policies}.items():
        ppl = prompt_perplexity(model, ids, policy, prompt_len, score_len, blocks, progress)
        full_ppl = full_ppl or ppl
        rate = needle_rate(model, tok, policy, needles, prompt_len, progress=progress) if needles else None
        delta = f"{100 * (ppl / full_ppl - 1):+.2f}%"
        rows.append((name, f"{ppl:.3f}", delta, "-" if rate is None else f"{rate:.0%}"))
        report["runs"][name] = {"perplexity": ppl, "needle_rate": rate, "policy": repr(policy)}
    return rows, report
