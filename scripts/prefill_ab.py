"""Prefill speed of a quantized model with int8 activations (kernels/gemm_q4_i8.cpp) against fp32
activations (the dequantized weights in oneDNN's GEMM, bf16 where the CPU has native bf16), in one
process, modes alternating round by round: the median of the per-round ratios per prompt length.

    python scripts/prefill_ab.py /tmp/h17/smollm2-Q4_0.gguf --lengths 17 40 64 128 256 512 --rounds 9
    python scripts/prefill_ab.py FILE --act-isa avx2 --fp32-gemm   (an AVX2 CPU's two paths, emulated)
    python scripts/prefill_ab.py smollm2 --recipe int8   (int8 weights: the GEMM on AVX-VNNI / AVX-512 VNNI)

A prefill here is model(ids) with logits at the last position only, as `leanformer bench` times it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--lengths", type=int, nargs="+", default=[17, 40, 64, 128, 256, 512])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--act-isa", default=None, help="avx2 / avx_vnni / avx512_vnni for the int8 side")
    p.add_argument("--fp32-gemm", action="store_true", help="fp32 side in fp32 even with native bf16")
    p.add_argument("--recipe", help="quantize the (dequantized) model with this recipe first, e.g. int8")
    a = p.parse_args()

    import leanformer as lf
    from leanformer.compress import qbase, set_prefill_activations
    from leanformer.hub import resolve_model
    from leanformer.kernels import cpu

    torch.set_num_threads(a.threads)
    if a.act_isa:
        cpu.set_act_isa(a.act_isa)
    if a.fp32_gemm:
        qbase.PREFILL_BF16 = False
    model, _ = lf.load(resolve_model(a.model), keep_quantized=a.recipe is None)
    if a.recipe:
        from leanformer.compress import apply, load_recipe

        apply(model, load_recipe(a.recipe))
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(vocab // 8, vocab - vocab // 8, (1, n), generator=g) for n in a.lengths}

    def prefill(mode: str, ids: torch.Tensor) -> float:
        set_prefill_activations(model, mode)
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, logits_at=torch.tensor([ids.shape[1] - 1]))
        return time.perf_counter() - t

    for ids in prompts.values():  # warm-up
        prefill("int8", ids), prefill("fp32", ids)
    times = {n: {"int8": [], "fp32": []} for n in a.lengths}
    for r in tqdm(range(a.rounds), desc="rounds"):
        for n, ids in prompts.items():
            for mode in ("int8", "fp32") if r % 2 == 0 else ("fp32", "int8"):
                times[n][mode].append(prefill(mode, ids))
    gemm = "bf16" if qbase.compute_dtype(torch.zeros(1)) == torch.bfloat16 else "fp32"
    print(
        f"{cpu.cpu_info()['model']}; int8 side {cpu.act_isa()}, fp32 side dequantize + {gemm} GEMM; ", end=""
    )
    print(f"{a.threads} threads, {a.rounds} rounds")
    print("| prompt tokens | int8 activations tok/s | fp32 activations tok/s | speed-up, median (range) |")
    print("|---|---|---|---|")
    for n, t in times.items():
        ratios = [f / i for i, f in zip(t["int8"], t["fp32"])]
        print(
            f"| {n} | {n / statistics.median(t['int8']):.0f} | {n / statistics.median(t['fp32']):.0f} | "
            f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
