"""Time to the first token in the server's paged scheduler, short prompt chunks as chained rows of the
fused decode step (engine/prefill.py) vs the padded forward, in one process, alternating per round.

    python scripts/prefill_sched_ab.py /tmp/h17/smollm2-Q4_0.gguf --prefix 200 --lengths 4 9 16 --rounds 9

Each round: one request whose prompt is a fixed --prefix-token system prompt (a prefix-cache hit after
the first request) plus LENGTH new tokens, alone in the scheduler: the time from submit to its first
token, i.e. the prefill of the LENGTH tokens past the cached prefix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prefix", type=int, default=200)
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 9, 16])
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()

    import leanformer as lf
    from leanformer.engine import prefill as P
    from leanformer.engine.paged import PagedScheduler
    from leanformer.engine.request import Request
    from leanformer.hub import resolve_model

    torch.set_num_threads(2)
    model, _ = lf.load(resolve_model(a.model), keep_quantized=True)
    sched = PagedScheduler(model, None, max_batch=4, max_seq=1024, num_blocks=256, block_size=16)
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    prefix = torch.randint(vocab // 8, vocab - vocab // 8, (a.prefix,), generator=g).tolist()
    limits = (P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX)

    def ttft(n: int, chained: bool) -> float:
        P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX = limits if chained else (0, 0, 0)
        tail = torch.randint(vocab // 8, vocab - vocab // 8, (n,), generator=g).tolist()
        first: list[float] = []
        req = Request(
            prefix + tail, 2, emit=lambda *_: first.append(time.perf_counter()) if not first else None
        )
        t = time.perf_counter()
        sched.submit(req)
        while sched.has_work():
            sched.step()
        return first[0] - t

    ttft(a.lengths[0], True)  # the prefix into the cache, kernels warm
    res = {n: {True: [], False: []} for n in a.lengths}
    for r in range(a.rounds):
        for n in a.lengths:
            for mode in (True, False) if r % 2 == 0 else (False, True):
                res[n][mode].append(ttft(n, mode))
    P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX = limits
    print(f"{a.model}: {a.prefix}-token cached prefix + N new tokens, alone, {a.rounds} rounds")
    print(
        "| new tokens | chained rows, ms | padded forward, ms | speed-up, median (range) |\n|---|---|---|---|"
    )
    for n, t in res.items():
        ratios = [f / c for c, f in zip(t[True], t[False])]
        print(
            f"| {n} | {statistics.median(t[True]) * 1e3:.1f} | {statistics.median(t[False]) * 1e3:.1f} | "
            f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
