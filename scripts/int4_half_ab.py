"""Decode and prefill speed of int4 / int8 modules holding their group-32 scales as fp16 only
(QuantLinear.compact_scales, the default since session 26) against the same model holding fp32 arrays
(the fused step then keeps its own fp16 copies for the 512-bit loops, as before), in one process,
rotating order round by round: medians of the per-round ratios. Memory: scripts/rss_check.py load.

    python scripts/int4_half_ab.py /tmp/h17/smollm2-Q4_0.gguf --batch 1 4 8 --rounds 7
    python scripts/int4_half_ab.py smollm2 --act-isa avx2       (the AVX2 loops: fp16 at every row count)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def prefill_s(model, tokens: int) -> float:
    """Seconds of one prefill of `tokens` random ids through a fresh cache (the chained prefill)."""
    from leanformer.engine.generate import decode
    from leanformer.engine.sampling import SamplingParams

    ids = torch.randint(100, model.args.vocab_size - 100, (1, tokens)).tolist()
    t0 = time.perf_counter()
    for _ in decode(model, ids, 1, SamplingParams(), fixed_model=True):
        break
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--act-isa", help="avx2 / avx_vnni / avx512_vnni (default: the best)")
    a = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ helpers
    from tests.compress.test_half_scales import held_fp32

    import leanformer as lf
    from leanformer.hub import resolve_model
    from leanformer.kernels import cpu
    from leanformer.measure.bench.paired import decode_tok_s

    if a.act_isa:
        try:
            cpu.set_act_isa(a.act_isa)
        except ValueError as e:
            raise SystemExit(f"--act-isa: {e}") from None
    half, _ = lf.load(resolve_model(a.model))
    variants = {"fp16 held": half, "fp32 arrays": held_fp32(half)}
    rows: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for m in variants.values():
            decode_tok_s(m, 1, 16, 4)
        order = list(variants)
        for r in tqdm(range(a.rounds), desc="rounds"):
            for what in [f"decode b={b}" for b in a.batch] + [f"prefill {a.prompt_tokens}"]:
                for name in order[r % 2 :] + order[: r % 2]:
                    m = variants[name]
                    if what.startswith("decode"):
                        v = decode_tok_s(m, int(what.split("=")[1]), a.prompt_tokens, a.new_tokens)
                    else:
                        v = a.prompt_tokens / prefill_s(m, a.prompt_tokens)
                    rows.setdefault((what, name), []).append(v)
    print(f"CPU act ISA {cpu.act_isa()}; {a.rounds} rounds")
    print(f"{'':16s} {'fp16 held tok/s':>16s} {'fp32 arrays tok/s':>18s} {'ratio (min-max)':>22s}")
    for what in dict.fromkeys(w for w, _ in rows):
        h, f = rows[what, "fp16 held"], rows[what, "fp32 arrays"]
        ratios = [x / y for x, y in zip(h, f)]
        print(
            f"{what:16s} {statistics.median(h):16.1f} {statistics.median(f):18.1f} "
            f"{statistics.median(ratios):10.3f}× ({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
