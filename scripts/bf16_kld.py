"""Quality of the bf16 weight recipes against fp32 on SmolLM2 (dequantized from its GGUF): PPL, mean KLD
and top-1 agreement on wiki.test.raw's first 60,000 characters (windows of 512), with the prefill GEMMs
in fp32 (the weights' own error) and as the CPU's default has them (bf16 activations where the CPU has
native bf16, compress/qbase.py PREFILL_BF16).

    python scripts/bf16_kld.py [--data ../shared/data/wikitext-2-raw/wiki.test.raw] [--max-chars 60000]
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--max-chars", type=int, default=60000)
    p.add_argument("--recipe", nargs="+", default=["bf16", "bf16+head-bf16"])
    args = p.parse_args()

    import leanformer as lf
    from leanformer.compress import apply, load_recipe, qbase
    from leanformer.hub import resolve_model
    from leanformer.measure.evaluate import evaluate, read_text, tokenize

    path = resolve_model("smollm2")
    ref, tok = lf.load(path, keep_quantized=False)
    ids = tokenize(tok, read_text(args.data, args.max_chars))
    print("| recipe | prefill | PPL (fp32) | mean KLD | top-1 |")
    print("|---|---|---|---|---|")
    for name in args.recipe:
        model, _ = lf.load(path, keep_quantized=False)
        apply(model, load_recipe(name), progress=False)
        for prefill_bf16 in (False, None):
            qbase.PREFILL_BF16 = prefill_bf16
            r = evaluate(model, ids, 512, reference=ref, progress=False)
            how = "fp32" if prefill_bf16 is False else "default"
            print(
                f"| {name} | {how} | {r.perplexity:.3f} ({r.reference_perplexity:.3f}) | {r.kld:.5f} |"
                f" {100 * r.top1_agreement:.1f}% |",
                flush=True,
            )
    qbase.PREFILL_BF16 = None


if __name__ == "__main__":
    main()
