"""Decode tok/s of one model kept quantized with fp32 activations and with int8 activations on each
int8-activation instruction set, in ONE process, interleaved round by round (issue #17: where the
fused step's "auto" should take int8 activations).

    python scripts/isa_decode_ab.py /tmp/h17/smollm2-Q4_0.gguf [--isa fp32 avx2 avx_vnni avx512_vnni]
        [--batch 1 8] [--rounds 7] [--threads 2] [--prompt-tokens 128] [--new-tokens 64]

--isa: "fp32" (fp32 activations) or an int8-activation instruction set (int8 activations on it).
Prints per batch size each variant's median tok/s (`leanformer bench`'s decode figure: the median step
of one generation) and the median over rounds of its ratio to the first variant in the same round.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--isa", nargs="+", default=["fp32", "avx512_vnni"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()

    from leanformer.kernels import cpu
    from leanformer.loading import load
    from leanformer.measure.bench.paired import decode_tok_s
    from leanformer.models.fused import set_decode_activations

    torch.set_num_threads(args.threads)
    model, _ = load(args.model, keep_quantized=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{cpu.cpu_info()['model']}; threads {args.threads}; loadavg {' '.join(load_before)}")
    print(
        "| batch | "
        + " | ".join(f"{i} tok/s" for i in args.isa)
        + " | "
        + " | ".join(f"{i} / {args.isa[0]}" for i in args.isa[1:])
        + " |"
    )
    print("|---" * (1 + 2 * len(args.isa) - 1) + "|")
    for b in args.batch:
        speeds: dict[str, list[float]] = {i: [] for i in args.isa}
        ratios: dict[str, list[float]] = {i: [] for i in args.isa[1:]}
        for r in range(args.rounds):
            order = args.isa if r % 2 == 0 else args.isa[::-1]
            got = {}
            for isa in order:
                set_decode_activations(model, "fp32" if isa == "fp32" else "int8")
                cpu.set_act_isa(None if isa == "fp32" else isa)
                got[isa] = decode_tok_s(model, b, args.prompt_tokens, args.new_tokens)
            for isa in args.isa:
                speeds[isa].append(got[isa])
            for isa in args.isa[1:]:
                ratios[isa].append(got[isa] / got[args.isa[0]])
        cpu.set_act_isa(None)
        med = [f"{statistics.median(speeds[i]):.1f}" for i in args.isa]
        rat = [
            f"{statistics.median(ratios[i]):.3f} ({min(ratios[i]):.2f}-{max(ratios[i]):.2f})"
            for i in args.isa[1:]
        ]
        print(f"| {b} | " + " | ".join(med) + " | " + " | ".join(rat) + " |", flush=True)
    print("loadavg after", " ".join(Path("/proc/loadavg").read_text().split()[:3]))


if __name__ == "__main__":
    main()
