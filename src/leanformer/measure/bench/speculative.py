"""Speculative decoding against plain decoding, in one process: tokens/s, acceptance, identical output.

Two workloads, because speculation's value depends on the text: input-grounded (rewrite a given
passage: the answer copies spans of the prompt, where prompt lookup shines) and open-ended (write a
story: little to copy, where speculation must not cost anything). Chat models get their chat template.
Methods run alternately, prompt after prompt, round after round, and each method's speed is reported as
the median over prompts and rounds of its tokens/s divided by plain decoding's on the same prompt in
the same round, so a shared machine's drift lands on both sides of each ratio.

    python -m leanformer.measure.bench.speculative smollm2 --keep-quantized --speculative prompt-lookup \
        --passages ../shared/data/wikitext-2-raw/wiki.test.raw --threads 1
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from leanformer.errors import LeanformerError

# Used when no --passages file is given: an input-grounded task needs some passage to work from.
BUILTIN_PASSAGE = (
    "The lighthouse on Gull Point was built in 1871 from granite quarried on the island itself. Its first "
    "keeper, Thomas Reid, kept a logbook of every ship that passed, and the logbook survives in the town "
    "museum. In 1932 the oil lamp was replaced by an electric light, and in 1987 the light was automated "
    "and the last keeper left the island. Today the lighthouse is open to visitors in the summer months."
)
STORY_TOPICS = (
    "a dragon who is afraid of the dark",
    "a robot that learns to bake bread",
    "two friends lost at sea",
)
GROUNDED = "Rewrite the following passage, keeping every fact and name:\n\n{passage}"
OPEN = "Write a story about {topic}."


@dataclass
class SpecBenchConfig:
    new_tokens: int = 128
    rounds: int = 3
    prompts: int = 3  # per workload
    passages: str | None = None  # a text file; paragraphs of at least MIN_CHARS are used
    methods: dict = field(default_factory=dict)  # label → speculative argument ("plain" → None)
    profile: bool = False  # time the target's forwards apart from everything else a step does


MIN_CHARS = 300


def passages(path: str | None, n: int) -> list[str]:
    """n paragraphs from a text file (wikitext's ' @-@ ' joins undone; CRLF or LF), else the built-in one."""
    if path is None:
        return [BUILTIN_PASSAGE] * n
    p = Path(path).expanduser()
    if not p.is_file():
        raise LeanformerError(f"--passages {path}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(a, b)
    paras = [line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_CHARS]
    if not paras:
        raise LeanformerError(f"--passages {path}: no paragraph of {MIN_CHARS}+ characters")
    # short paragraphs first: the rewrite should fit in new_tokens, so there is text left to copy
    return sorted(paras[: 20 * n], key=len)[:n]


def workload_prompts(tok, cfg: SpecBenchConfig) -> dict[str, list]:
    """workload → prompts (chats for a model with a chat template, plain text otherwise)."""
    texts = {
        "input-grounded": [GROUNDED.format(passage=p) for p in passages(cfg.passages, cfg.prompts)],
        "open-ended": [OPEN.format(topic=STORY_TOPICS[i % len(STORY_TOPICS)]) for i in range(cfg.prompts)],
    }
    chat = tok is not None and getattr(tok, "chat_template", None)
    return {w: [[{"role": "user", "content": t}] if chat else t for t in ts] for w, ts in texts.items()}


def parse_method(text: str, load_draft) -> tuple[str, object]:
    """'prompt-lookup' | 'draft:PATH' → (label, speculative argument); load_draft(path) → model."""
    from leanformer.engine.speculative import DraftModel

    if text == "prompt-lookup":
        return text, text
    if text.startswith("layer-skip:") and text[len("layer-skip:") :].isdigit():
        return text, text  # checked against the model's depth when generation starts
    if text.startswith("draft:") and len(text) > len("draft:"):
        path = text[len("draft:") :]
        return f"draft {Path(path).name}", DraftModel(load_draft(path))
    raise LeanformerError(f"--speculative {text!r}: use prompt-lookup, layer-skip:N or draft:PATH")


class _ForwardTimer:
    """Seconds and rows of each forward of `model` itself (hooks; a LayerSkip draft, which shares the
    hook tables through early_exit's shallow copy, is not counted)."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []  # calls: (rows, seconds)

    def __enter__(self):
        import time

        def pre(m, args, kwargs):
            if m is self.model:
                m._bench_t0 = time.perf_counter()

        def post(m, args, kwargs, out):
            if m is self.model:
                ids = args[0] if args else kwargs["input_ids"]
                self.calls.append((ids.shape[0], time.perf_counter() - m._bench_t0))

        self.hooks = [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


def _one(model, tok, prompt, new_tokens: int, spec, profile: bool = False) -> dict:
    import contextlib

    from leanformer.engine.generate import GenerationStats, encode_prompt, generate

    # token ids in, token ids out: the chat template, tokenizing and detokenizing cost the same with or
    # without speculation, and on short answers they would dilute the ratio being measured
    ids = encode_prompt(tok, prompt) if tok is not None else prompt
    st = GenerationStats()
    timer = _ForwardTimer(model) if profile else None
    with timer or contextlib.nullcontext():
        out = generate(model, tok, ids, max_new_tokens=new_tokens, stats=st, speculative=spec)  # ids back
    forwards = timer.calls[1:] if timer else []  # the first is the prefill
    # Decode speed = tokens after the first (which the prefill gives) over the decode steps' own time
    # (stats.decode_s: per step, so a stop at EOS counts too; prefill, setup and the caller's per-token
    # work are the same with or without speculation and stay out of the ratio)
    return {
        "out": out,
        "tokens": st.new_tokens,
        "tok_s": (st.new_tokens - 1) / max(st.decode_s, 1e-9),
        "stats": st,
        "forwards": forwards,
    }


def run(model, tok, cfg: SpecBenchConfig) -> list[dict]:
    """One row per (workload, method): median tok/s, median ratio to plain, acceptance, identical output."""
    methods = {"plain": None, **cfg.methods}
    rows = []
    for workload, prompts in workload_prompts(tok, cfg).items():
        for m in methods.values():  # warm-up: builds the fused decode stack, times verification rows
            _one(model, tok, prompts[0], 8, m)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        ratios: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(cfg.rounds):
            for prompt in prompts:
                order = list(methods)
                order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
                res = {m: _one(model, tok, prompt, cfg.new_tokens, methods[m], cfg.profile) for m in order}
                for m in methods:
                    runs[m].append(res[m] | {"same": res[m]["out"] == res["plain"]["out"]})
                    ratios[m].append(res[m]["tok_s"] / res["plain"]["tok_s"])
        for m in methods:
            st = [x["stats"] for x in runs[m]]
            drafted = sum(s.drafted for s in st)
            rows.append(
                {
                    "workload": workload,
                    "method": m,
                    "tok_s": statistics.median(x["tok_s"] for x in runs[m]),
                    "ratio": statistics.median(ratios[m]),
                    "acceptance": sum(s.accepted for s in st) / drafted if drafted else 0.0,
                    "tokens_per_round": sum(s.new_tokens for s in st) / max(1, sum(s.steps for s in st)),
                    "fallbacks": sum(s.fallbacks for s in st),
                    "identical": all(x["same"] for x in runs[m]),
                    "new_tokens": statistics.median(x["tokens"] for x in runs[m]),
                    **(_profile(runs[m]) if cfg.profile else {}),
                }
            )
    return rows


def _profile(runs: list[dict]) -> dict:
    """Per decode step: the target's forward vs everything else the step does (lookup, drafting,
    verification, rollback, bookkeeping), and the median forward time per row count."""
    steps = sum(x["stats"].steps for x in runs)
    decode = sum(x["stats"].decode_s for x in runs)
    fwd = [c for x in runs for c in x["forwards"]]
    by_rows: dict[int, list[float]] = {}
    for rows, sec in fwd:
        by_rows.setdefault(rows, []).append(sec)
    return {
        "forward_ms": 1e3 * sum(s for _, s in fwd) / max(steps, 1),
        "other_us": 1e6 * (decode - sum(s for _, s in fwd)) / max(steps, 1),
        "rows": {r: (len(v), 1e3 * statistics.median(v)) for r, v in sorted(by_rows.items())},
    }


HEADER = [
    "workload",
    "method",
    "tokens/s",
    "× plain",
    "acceptance",
    "tokens / step",
    "fall-backs",
    "same output",
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [
        [
            r["workload"], r["method"], f"{r['tok_s']:.1f}", f"{r['ratio']:.2f}×",
            "-" if r["method"] == "plain" else f"{100 * r['acceptance']:.0f}%",
            f"{r['tokens_per_round']:.2f}", str(r["fallbacks"]), "yes" if r["identical"] else "NO",
        ]
        for r in rows
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--keep-quantized", action="store_true")
    p.add_argument("--speculative", nargs="+", default=["prompt-lookup"])
    p.add_argument("--passages", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--profile", action="store_true", help="per step: forward time vs everything else")
    p.add_argument(
        "--activations", choices=["auto", "int8", "fp32"], default="auto",
        help="the fused decode step's activations for int4/int8 Linears (models/fused.py)",
    )  # fmt: skip
    args = p.parse_args(argv)
    import torch

    from leanformer.hub import resolve_model
    from leanformer.loading import load

    if args.threads is not None:
        if args.threads < 1:
            raise LeanformerError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    model, tok = load(resolve_model(args.model), keep_quantized=args.keep_quantized)
    from leanformer.models.fused import set_decode_activations

    set_decode_activations(model, args.activations)
    cfg = SpecBenchConfig(args.new_tokens, args.rounds, args.prompts, args.passages, profile=args.profile)
    cfg.methods = dict(parse_method(m, lambda path: load_draft(path)) for m in args.speculative)
    rows = run(model, tok, cfg)
    load_avg = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    print(f"# {torch.get_num_threads()} torch threads, load average after the run: {' '.join(load_avg)}")
    for r in table_rows(rows):
        print(" | ".join(r))
    for r in rows if args.profile else []:
        per_rows = " ".join(f"{n}:{c}x{ms:.2f}" for n, (c, ms) in r["rows"].items())
        print(
            f"{r['workload']} | {r['method']} | forward {r['forward_ms']:.2f} ms/step | other "
            f"{r['other_us']:.0f} µs/step | rows:count x median ms {per_rows}"
        )
    return rows


def load_draft(path: str):
    """A draft model: a GGUF keeps its int blocks (the cheapest draft), other formats load as they are."""
    from leanformer.hub import resolve_model
    from leanformer.loading import load

    resolved = resolve_model(path)
    return load(resolved, keep_quantized=str(resolved).endswith(".gguf"))[0]


if __name__ == "__main__":
    main()
