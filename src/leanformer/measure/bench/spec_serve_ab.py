"""The server's scheduler with speculation on vs off, in one process, on a CPU-time clock.

bench-serve --speculative (serve/spec_bench.py) measures what a client sees, in wall-clock time over
HTTP; on a shared 2-core machine under load 5-13 its per-round ratios swung 0.5-2.4x even where both
sides did the same work (open-ended, nothing drafted). This runs the same workloads through the same
PagedScheduler + SpecDecoder the server uses, on one thread, timing the engine thread's CPU time
(time.thread_time): the work speculation saves or costs, blind to preemption. The two sides run in
lockstep: two schedulers, one with speculation on and one off, each serving the same requests, take
their steps in turn (which one goes first alternates), each step timed on its side's clock. A VM's
speed drifts by tens of percent within seconds (a neighbour's memory traffic, clocks): with whole rounds
one after the other that drift landed between the sides (identical work read 0.78-1.15x per round);
step by step it falls on both alike. The ratio is off's CPU time over on's, per round, and the median.

    python -m leanformer.measure.bench.spec_serve_ab smollm2 --concurrency 4 --requests 8 --rounds 4 \
        --passages ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from leanformer.errors import LeanformerError
from leanformer.measure.bench.speculative import SpecBenchConfig, workload_prompts


def _encode(tok, prompt) -> list[int]:
    if isinstance(prompt, list):  # a chat
        return tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    return tok.encode(prompt)


def lengths(requests: int, max_tokens: int, stagger: bool) -> list[int]:
    """Each request's max_tokens: all alike, or (stagger) spread evenly over 0.75-1.25x max_tokens, so
    requests finish at different steps on both sides, as a server's do: with equal lengths the plain
    side's requests all finish at one step and the next prompts prefill together in one forward, which
    a kept draft (one request a step ahead) breaks on the speculative side."""
    if not stagger or requests == 1:
        return [max_tokens] * requests
    return [max(1, round(max_tokens * (0.75 + 0.5 * i / (requests - 1)))) for i in range(requests)]


def _run(
    scheds: list, prompts: list[list[int]], max_tokens: list[int], modes: list[str | None]
) -> list[float]:
    """CPU seconds of this thread each scheduler took to serve `prompts` (all submitted at once, the
    slots bounding the batch; prompt i asks for max_tokens[i]), scheds[i] with speculative=modes[i],
    their steps taken in turn."""
    from leanformer.engine.request import Request

    for sched, mode in zip(scheds, modes):
        for p, n in zip(prompts, max_tokens):
            sched.submit(Request(list(p), n, speculative=mode))
    cpu = [0.0] * len(scheds)
    while any(s.has_work() for s in scheds):
        for i, sched in enumerate(scheds):
            if sched.has_work():
                t = time.thread_time()
                sched.step()
                cpu[i] += time.thread_time() - t
    return cpu


@torch.inference_mode()
def measure(
    model,
    tok,
    concurrency: int,
    requests: int,
    max_tokens: int,
    rounds: int,
    passages=None,
    stagger: bool = False,
) -> dict:
    """workload → {"ratios": off / on CPU time per round, "speedup": their median, "acceptance", "drafted"}."""
    from leanformer.engine.paged import PagedScheduler
    from leanformer.engine.spec_batch import SpecDecoder

    cfg = SpecBenchConfig(prompts=requests, passages=passages)
    loads = {w: [_encode(tok, p) for p in ps] for w, ps in workload_prompts(tok, cfg).items()}
    budget = lengths(requests, max_tokens, stagger)
    longest = max(len(p) for ps in loads.values() for p in ps) + max(budget)
    block = 16

    def scheduler():
        # no prefix cache: every round repeats the same prompts, whose cached KV the spec side's draft
        # blocks would evict sooner (open-ended after input-grounded read 0.96x with it, 0.98x first)
        blocks = concurrency * (longest // block + 2)
        sched = PagedScheduler(model, tok, concurrency, longest, blocks, block, prefix_caching=False)
        sched.spec = SpecDecoder()
        sched.spec.calibrate(sched)  # once per model: both share the timing
        return sched

    on, off = scheduler(), scheduler()
    out = {}
    for name, prompts in loads.items():
        _run([on, off], prompts, budget, ["prompt-lookup", None])  # warm-up
        d0, a0 = on.spec.drafted_total, on.spec.accepted_total
        cpu: dict[str | None, list[float]] = {None: [], "prompt-lookup": []}
        for i in range(rounds):
            pair = [(off, None), (on, "prompt-lookup")][:: 1 if i % 2 == 0 else -1]  # who steps first
            for (_, mode), sec in zip(
                pair, _run([s for s, _ in pair], prompts, budget, [m for _, m in pair])
            ):
                cpu[mode].append(sec)
        ratios = [off_s / on_s for on_s, off_s in zip(cpu["prompt-lookup"], cpu[None])]
        drafted = on.spec.drafted_total - d0
        out[name] = {
            "ratios": ratios,
            "speedup": statistics.median(ratios),
            "acceptance": (on.spec.accepted_total - a0) / drafted if drafted else 0.0,
            "drafted": drafted,
            "off_tok_per_cpu_s": sum(budget) / statistics.median(cpu[None]),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    from leanformer.hub import resolve_model
    from leanformer.loading import load

    def positive_int(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        return int(text)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--concurrency", type=positive_int, default=4)
    ap.add_argument("--requests", type=positive_int, default=8)
    ap.add_argument("--max-tokens", type=positive_int, default=96)
    ap.add_argument("--rounds", type=positive_int, default=4)
    ap.add_argument("--passages", default=None)
    ap.add_argument(
        "--stagger", action="store_true",
        help="requests ask for 0.75-1.25x --max-tokens (spread evenly), so they do not all finish at one step",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.passages is not None and not Path(args.passages).expanduser().is_file():
        raise LeanformerError(f"--passages {args.passages}: no such file")  # before the model loads
    torch.set_num_threads(1)  # the CPU-time clock reads this thread only
    model, tok = load(resolve_model(args.model))
    from leanformer.engine.startup import freeze_startup_objects

    freeze_startup_objects()  # as `leanformer serve` does after loading
    avg = Path("/proc/loadavg")
    loadavg = " ".join(avg.read_text().split()[:3]) if avg.exists() else "?"
    res = measure(
        model, tok, args.concurrency, args.requests, args.max_tokens, args.rounds, args.passages, args.stagger
    )
    for name, r in res.items():
        print(
            f"{name}: {args.concurrency} streams, CPU-time speed-up {r['speedup']:.2f}x (rounds "
            f"{', '.join(f'{x:.2f}' for x in r['ratios'])}), acceptance {r['acceptance']:.2f} of "
            f"{r['drafted']} drafted, off {r['off_tok_per_cpu_s']:.1f} tokens per CPU-second; load {loadavg}"
        )
    return res


if __name__ == "__main__":
    import sys

    try:
        main()
    except LeanformerError as e:
        sys.exit(f"error: {e}")
