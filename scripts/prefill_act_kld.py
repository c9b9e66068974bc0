"""What int8 activations cost a quantized model's prefill in quality: KLD and top-1 agreement of the
int8-activation int4 GEMM (kernels/gemm_q4_i8.cpp) against the fp32 path on the same weights (the
dequantized weights in an fp32 GEMM), next to the same weights in a bf16 GEMM (the default prefill on
CPUs with native bf16) and the int4 variant's own KLD against the weights it came from.

    python scripts/prefill_act_kld.py /tmp/h17/smollm2-Q4_0.gguf --reference smollm2 \\
        --data ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8 --window 512
    python scripts/prefill_act_kld.py stories260K-int4 ...  (any model lf.load reads; --recipe to quantize)

Both paths run with fp32 prefill (`qbase.PREFILL_BF16 = False`), so bf16 rounding is not in the figure.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--reference", help="the float (or finer) weights the variant came from")
    p.add_argument("--recipe", help="quantize MODEL with this recipe first (e.g. int4-g64)")
    p.add_argument("--keep-quantized", action="store_true", default=True)
    p.add_argument("--data", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    a = p.parse_args()

    import leanformer as lf
    from leanformer.compress import apply, load_recipe, qbase
    from leanformer.compress.qbase import set_prefill_activations
    from leanformer.measure.evaluate import read_text, tokenize

    qbase.PREFILL_BF16 = False
    torch.set_num_threads(2)
    from leanformer.hub import resolve_model

    model, tok = lf.load(resolve_model(a.model), keep_quantized=a.keep_quantized)
    if a.recipe:
        apply(model, load_recipe(a.recipe))
    ref = lf.load(resolve_model(a.reference), keep_quantized=True)[0] if a.reference else None
    if ref is not None:
        set_prefill_activations(ref, "fp32")
    ids = torch.tensor(tokenize(tok, read_text(a.data)))
    w = min(a.window, len(ids) // a.windows)
    sums = {k: [0.0, 0] for k in ("int8 vs fp32 act", "bf16 GEMM vs fp32", "int4 (fp32 act) vs reference")}
    nll = {"fp32": 0.0, "int8": 0.0, "reference": 0.0}
    n = 0
    for i in tqdm(range(a.windows), desc="windows"):
        batch = ids[i * w : (i + 1) * w][None]
        with torch.inference_mode():
            set_prefill_activations(model, "fp32")
            lp32 = F.log_softmax(model(batch).float(), -1)[0, :-1]
            qbase.PREFILL_BF16 = True  # the dequantized weights in a bf16 GEMM: another rounding, for scale
            lp16 = F.log_softmax(model(batch).float(), -1)[0, :-1]
            qbase.PREFILL_BF16 = False
            set_prefill_activations(model, "int8")
            lp8 = F.log_softmax(model(batch).float(), -1)[0, :-1]
            lpr = F.log_softmax(ref(batch).float(), -1)[0, :-1] if ref is not None else None
        target = batch[0, 1:, None]
        n += len(target)
        for name, lp in (("fp32", lp32), ("int8", lp8), ("reference", lpr)):
            if lp is not None:
                nll[name] -= lp.gather(-1, target).sum().item()
        pairs = [("int8 vs fp32 act", lp8, lp32), ("bf16 GEMM vs fp32", lp16, lp32)]
        if lpr is not None:
            pairs.append(("int4 (fp32 act) vs reference", lp32, lpr))
        for name, lp, base in pairs:
            sums[name][0] += (base.exp() * (base - lp)).sum().item()
            sums[name][1] += (base.argmax(-1) == lp.argmax(-1)).sum().item()
    print(f"{a.model}: {a.windows} windows of {w} tokens ({n} scored), fp32 prefill GEMMs")
    print("| comparison | KLD | top-1 agreement |\n|---|---|---|")
    for name, (kld, agree) in sums.items():
        if name.endswith("reference") and ref is None:
            continue
        print(f"| {name} | {kld / n:.5f} | {agree / n:.4f} |")
    print("perplexity: " + ", ".join(f"{k} {math.exp(v / n):.3f}" for k, v in nll.items() if v))


if __name__ == "__main__":
    main()
