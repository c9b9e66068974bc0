"""Batch-1 greedy decode speed of two or more models as ratios, measured in ONE process, interleaved
(A, B, A, B, ...) so machine load hits every model alike (docs/BENCHMARKS.md, issue #12: a K-quant
GGUF kept quantized against a Q4_0 file of the same weights).

    python scripts/decode_ratio.py BASELINE OTHER [OTHER ...] [--repeats 7] [--tokens 32] [--threads 1]
                                   [--clock wall|cpu]

Prints each model's median tok/s over the repeats (each repeat: the median step of one generation of
`--tokens` tokens after a 64-token prompt), its ratio to the first model, and /proc/loadavg before
and after. `--clock cpu` times the steps in CPU time of the decoding thread (time.thread_time; with
--threads 1 all the step's work runs there): on a shared, overloaded machine wall-clock steps also
count the time the thread waited for a core, which hits the models unevenly.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model paths (the first is the baseline)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    a = p.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        p.error("--clock cpu needs --threads 1 (it counts the calling thread's CPU time only)")

    import torch

    import leanformer as lf
    from leanformer.engine.generate import decode
    from leanformer.engine.sampling import SamplingParams
    from leanformer.measure.bench.runner import decode_rate, leanformer_decode_steps

    def cpu_steps(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """leanformer_decode_steps in the decoding thread's CPU time."""
        stamps = [time.thread_time() for _ in decode(model, prompts, new_tokens, SamplingParams())]
        return [b - a for a, b in zip(stamps, stamps[1:])]  # as _step_times: gaps between tokens

    steps = cpu_steps if a.clock == "cpu" else leanformer_decode_steps

    torch.set_num_threads(a.threads)
    models = [lf.load(m)[0] for m in a.models]
    vocab = min(m.args.vocab_size for m in models)
    prompt = torch.randint(10, vocab, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    for m in models:  # warm-up: kernels built, caches allocated
        leanformer_decode_steps(m, [prompt], 4)
    before = loadavg()
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(a.repeats):
        for i, m in enumerate(models):
            rates[i].append(decode_rate([steps(m, [prompt], a.tokens)], 1))
    base = statistics.median(rates[0])
    for path, r in zip(a.models, rates):
        med = statistics.median(r)
        print(f"{Path(path).name}: {med:.1f} tok/s (median of {a.repeats}), {med / base:.2f}x the first")
    print(f"threads {a.threads}, {a.clock} clock; loadavg before {before}, after {loadavg()}")


if __name__ == "__main__":
    main()
