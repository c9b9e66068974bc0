"""Long-context quality and cost of KV policies (models/kv_policy.py): `leanformer eval --long`.

- stream_perplexity: a long text streamed through one cache in pieces of `piece` tokens (1: every
  token is a real decode step, the fused C++ step included), each piece scoring the next tokens;
  perplexity overall and over the first `fit` tokens (where full attention fits the context), RSS and
  decode tok/s at checkpoints. Memory is sampled from /proc (current RSS) and getrusage (peak).
- prompt_perplexity: blocks of `prompt_len` tokens compressed by an eviction policy, then the next
  `score_len` tokens scored through the compressed cache: ΔPPL next to the full cache on the same blocks.
- decode_rate: greedy decode tok/s after a long prompt through a policy's cache (H2O on the fused step
  with its replays, or on the module path), `python -m leanformer.measure.long_context`.
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


@torch.inference_mode()
def decode_rate(model, prompt: list[int], policy: Policy | None, new_tokens: int) -> dict:
    """Greedy decode speed after `prompt` (prefilled untimed, in the pieces the cache takes) through
    `policy`'s cache (None: the full cache) → {"tok_s", "replay_s" (H2O's replays, inside the timed
    decode), "kv_mb"}."""
    total = len(prompt) + new_tokens
    cache = _cache(model, policy, total, len(prompt))
    slots = torch.zeros(1, dtype=torch.long)
    piece = getattr(cache, "piece", total)
    with observe_queries(model, cache):
        for lo in range(0, len(prompt), piece):
            x = torch.tensor([prompt[lo : lo + piece]])
            logits = model(x, cache=cache, slots=slots, logits_at=torch.tensor([x.shape[1] - 1]))
            cache.advance(slots, x.shape[1])
        replay_before = getattr(cache, "replay_s", 0.0)
        token = logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(token.view(1, 1), cache=cache, slots=slots)
            cache.advance(slots, 1)
            token = logits[0, -1].argmax()
        seconds = time.perf_counter() - t0
    replay_s = getattr(cache, "replay_s", 0.0) - replay_before
    return {"tok_s": new_tokens / seconds, "replay_s": replay_s, "kv_mb": cache.nbytes() / 2**20}


def main(argv: list[str] | None = None) -> int:
    """Decode tok/s with H2O (fused step + replay, and the module path) vs the full cache, interleaved."""
    import argparse
    import json
    from pathlib import Path

    import leanformer as lf
    from leanformer.hub import resolve_model
    from leanformer.measure.evaluate import read_text, tokenize
    from leanformer.models.kv_policy import HeavyHitters

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[4] / "shared/data/tinyshakespeare/input.txt")
    )
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="bench-results/h2o_decode.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = lf.load(resolve_model(a.model))
    prompt = tokenize(tok, read_text(a.data, 40 * a.prompt_len))[: a.prompt_len]
    modes = {
        "full cache": None,
        "h2o, fused step + replay": HeavyHitters(a.budget),
        "h2o, module path": HeavyHitters(a.budget),
    }
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    load = [Path("/proc/loadavg").read_text().strip()]
    for _ in tqdm(range(a.repeats), desc="repeats"):
        for name, policy in modes.items():  # interleaved: the load hits every mode alike
            model.fused_decode = name != "h2o, module path"
            runs[name].append(decode_rate(model, prompt, policy, a.new_tokens))
    model.fused_decode = True
    load.append(Path("/proc/loadavg").read_text().strip())
    full = statistics.median(r["tok_s"] for r in runs["full cache"])
    report = {
        "model": a.model,
        "prompt_len": len(prompt),
        "budget": a.budget,
        "new_tokens": a.new_tokens,
        "loadavg": load,
        "runs": runs,
    }
    print(
        f"{a.model}, {len(prompt)}-token prompt, {a.new_tokens} new tokens, KV budget {a.budget}, load {load}"
    )
    for name, rs in runs.items():
        tok_s = statistics.median(r["tok_s"] for r in rs)
        share = statistics.median(r["replay_s"] * r["tok_s"] / a.new_tokens for r in rs)
        print(
            f"  {name:26s} {tok_s:6.1f} tok/s  {tok_s / full:5.2f}x full  replay {share:5.1%} of decode  KV {rs[0]['kv_mb']:.1f} MB"
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
