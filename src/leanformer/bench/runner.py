"""`leanformer bench`: prefill and decode speed, time to first token, peak RSS and size.

Each engine runs in its own subprocess (so peak RSS is its own), back-to-back in one invocation, on
the same weights and the same random prompts. Decode speed is measured the same way for every
engine: (time to generate N tokens − time to generate 1 token) / (N − 1) steps, so prefill and
first-token costs cancel out. Every figure is the median of `repeats` runs after a warm-up.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class BenchConfig:
    model: str
    dtype: str = "float32"
    prompt_tokens: int = 128
    new_tokens: int = 128
    batches: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3
    threads: int | None = None
    recipe: str | None = None  # a compression recipe applied after loading (ours only)
    keep_quantized: bool = False  # GGUF blocks straight into int modules (ours only)


def _prompts(vocab: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(10, vocab, (batch, length), generator=g)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _nbytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as saved (tied tensors counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _rss_mb() -> float:
    """Peak RSS of this process, MB. VmHWM where /proc has it: getrusage's ru_maxrss survives exec, so
    a child started by a big parent (the demo holds models) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(cfg: BenchConfig, engine: str) -> dict:
    """Run inside the engine's own process; returns the figures as a dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if engine == "leanformer":
        import leanformer as lf

        model, _ = lf.load(cfg.model, dtype=cfg.dtype, keep_quantized=cfg.keep_quantized)
        if cfg.recipe:
            from ..compress import apply, load_recipe

            apply(model, load_recipe(cfg.recipe))
        vocab = model.args.vocab_size
        size = _nbytes(model)

        def run(ids: torch.Tensor, n: int) -> None:
            lf.generate(model, None, ids.tolist(), max_new_tokens=n, ignore_eos=True)

        def prefill(ids: torch.Tensor) -> None:
            with torch.inference_mode():
                model(ids, logits_at=torch.full((len(ids),), ids.shape[1] - 1))
    elif engine == "transformers":
        from ..reference import load_hf_reference

        model, _ = load_hf_reference(cfg.model, cfg.dtype)
        vocab = model.config.vocab_size
        size = _nbytes(model)

        def run(ids: torch.Tensor, n: int) -> None:
            with torch.inference_mode():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip

        def prefill(ids: torch.Tensor) -> None:
            with torch.inference_mode():
                model(ids, logits_to_keep=1)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    load_s = time.perf_counter() - t0
    out: dict = {"engine": engine, "dtype": cfg.dtype, "load_s": load_s, "size_mb": size / 2**20}
    one = _prompts(vocab, 1, cfg.prompt_tokens)
    out["prefill_ms"] = 1000 * _median_time(lambda: prefill(one), cfg.repeats)
    out["prefill_tok_s"] = cfg.prompt_tokens / out["prefill_ms"] * 1000
    out["ttft_ms"] = 1000 * _median_time(lambda: run(one, 1), cfg.repeats)
    for b in cfg.batches:
        ids = _prompts(vocab, b, cfg.prompt_tokens)
        t1 = _median_time(lambda ids=ids: run(ids, 1), cfg.repeats)
        tn = _median_time(lambda ids=ids: run(ids, cfg.new_tokens), cfg.repeats)
        # (tN − t1) isolates the decode steps; on a noisy machine with a tiny model it can come out ≤ 0,
        # then the whole-generation rate is the honest lower bound
        out[f"decode_tok_s_b{b}"] = (
            b * (cfg.new_tokens - 1) / (tn - t1) if tn > t1 else b * cfg.new_tokens / tn
        )
    out["peak_rss_mb"] = _rss_mb()
    out["ceiling_tok_s"] = _bandwidth_ceiling_tok_s(size, cfg.repeats)  # after RSS: it allocates
    return out


def _bandwidth_ceiling_tok_s(nbytes: int, repeats: int) -> float:
    """Batch-1 decode reads every weight once per token, so tokens/s can't beat streaming `nbytes`
    from memory: time a torch.sum over as many bytes, in this process, right after the decode runs."""
    buf = torch.ones(max(nbytes // 4, 1))
    buf.sum()  # warm-up: first touch
    times = []
    for _ in range(max(repeats, 7)):  # the best run: a ceiling, and other tenants only slow it down
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return 1 / min(times)


def run_engine(cfg: BenchConfig, engine: str) -> dict:
    """Measure one engine in a fresh Python process and return its figures."""
    code = (
        "import json,sys; from leanformer.bench.runner import BenchConfig, measure; "
        "cfg = BenchConfig(**json.loads(sys.argv[1])); print(json.dumps(measure(cfg, sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg)), engine],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} benchmark failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], batches: list[int]) -> str:
    """Plain-text table (also what the CLI prints through rich)."""
    cols = ["engine", "dtype", "prefill_ms", "prefill_tok_s", "ttft_ms"] + [
        f"decode_tok_s_b{b}" for b in batches
    ]
    cols += ["peak_rss_mb", "size_mb"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(
            " | ".join(f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
        )
    return "\n".join(lines)
