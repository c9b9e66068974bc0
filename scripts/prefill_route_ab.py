"""Time to the first token of `generate`: prompts prefilled as chained rows of the fused decode step
(engine/prefill.py) vs one padded forward, in one process, alternating per round.

    python scripts/prefill_route_ab.py /tmp/h17/smollm2-Q4_0.gguf --lengths 9 17 32 40 64 128 256 512 --rounds 7

The padded side sets engine.prefill's limits to 0 (every prompt through the padded forward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--lengths", type=int, nargs="+", default=[9, 17, 32, 40, 64, 128, 256, 512])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--recipe", help="quantize the (dequantized) model with this recipe first, e.g. int8")
    a = p.parse_args()

    import leanformer as lf
    from leanformer.engine import prefill as P
    from leanformer.engine.generate import generate
    from leanformer.hub import resolve_model

    torch.set_num_threads(2)
    model, _ = lf.load(resolve_model(a.model), keep_quantized=a.recipe is None)
    if a.recipe:
        from leanformer.compress import apply, load_recipe

        apply(model, load_recipe(a.recipe))
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    limits = (P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX)

    def ttft(ids: list[int], chained: bool) -> float:
        P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX = limits if chained else (0, 0, 0)
        t = time.perf_counter()
        generate(model, None, ids, max_new_tokens=1, ignore_eos=True)
        return time.perf_counter() - t

    print(f"{a.model}: generate(max_new_tokens=1), {a.rounds} rounds")
    print(
        "| prompt tokens | chained ms (tok/s) | padded ms (tok/s) | speed-up, median (range) |\n|---|---|---|---|"
    )
    for n in a.lengths:
        ids = torch.randint(vocab // 8, vocab - vocab // 8, (n,), generator=g).tolist()
        ttft(ids, True), ttft(ids, False)  # warm-up
        t = {True: [], False: []}
        for r in range(a.rounds):
            for mode in (True, False) if r % 2 == 0 else (False, True):
                t[mode].append(ttft(ids, mode))
        c, f = statistics.median(t[True]), statistics.median(t[False])
        ratios = [y / x for x, y in zip(t[True], t[False])]
        print(
            f"| {n} | {c * 1e3:.1f} ({n / c:.0f}) | {f * 1e3:.1f} ({n / f:.0f}) | "
            f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    P.MAX_ROWS, P.CHAIN_MAX, P.GEMM_CHAIN_MAX = limits


if __name__ == "__main__":
    main()
