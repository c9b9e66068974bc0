"""`leanformer bench`: prefill and decode speed, time to first token, peak RSS and size.

Each engine runs in its own subprocess (so peak RSS is its own), back-to-back in one invocation, on
the same weights and the same random prompts. Decode speed is measured the same way for every
engine: each decode step (one new token per row, after the prefill) is timed on its own while the
engine generates N tokens, and tokens/s = batch / the median step over all `repeats` runs after a
warm-up. A median of steps is what one slow run or a stall on a shared machine cannot move; the
earlier (t_N − t_1) / (N − 1) scheme subtracted two noisy medians and once doubled a headline figure.
Prefill and time to first token are the median of `repeats` whole runs after a warm-up.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# shared with the peers' own processes (peer_worker.py imports neither torch nor leanformer)
from leanformer.measure.bench.peer_worker import _median_time
from leanformer.measure.bench.peer_worker import rss_mb as _rss_mb


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
    activations: str = "auto"  # int4 / int8 Linears on "int8" or "fp32" activations; "auto" (ours only)


def _prompts(vocab: int, batch: int, length: int) -> torch.Tensor:
    """The random prompt ids every engine gets, peers included (peer_worker.py has no torch)."""
    from leanformer.measure.bench.peer_worker import prompts

    return torch.tensor(prompts(vocab, batch, length))


def decode_rate(step_times: Sequence[Sequence[float]], batch: int) -> float:
    """Decode tokens/s from per-step timings (seconds) of one or more runs: `batch` tokens per step over
    the median step of all runs pooled, so a slow warm-up run or a few stalled steps leave it alone."""
    steps = [t for run in step_times for t in run]
    if not steps:
        raise ValueError("no decode steps were timed: generate at least 2 tokens")
    return batch / statistics.median(steps)


def _step_times(stamps: list[float]) -> list[float]:
    """Times of successive token arrivals → the decode steps between them (prefill + first token, the
    time before stamps[0], is not a decode step)."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def leanformer_decode_steps(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of each decode step of greedy generation, as `leanformer.generate` runs it: the engine's
    `decode` yields once per step, so the gap between two yields is exactly one step (fixed_model, as
    generate passes it: this loop changes nothing between steps either)."""
    from leanformer.engine.generate import decode
    from leanformer.engine.sampling import SamplingParams

    stamps = []
    for _ in decode(model, prompts, new_tokens, SamplingParams(), fixed_model=True):
        stamps.append(time.perf_counter())
    return _step_times(stamps)


def _runs_of_steps(fn: Callable[[], list[float]], repeats: int) -> list[list[float]]:
    fn()  # warm-up
    return [fn() for _ in range(repeats)]


def variant_name(cfg: BenchConfig, engine: str) -> str:
    """What a bench column measured: the recipe (by name) or the GGUF's own blocks when one applies to
    this engine, else the float dtype, so compressed columns are not all labelled "float32"."""
    kept = cfg.keep_quantized and Path(cfg.model).suffix == ".gguf"  # it changes nothing elsewhere
    if engine != "leanformer" or not (cfg.recipe or kept):
        return cfg.dtype
    name = Path(cfg.recipe).stem if cfg.recipe and Path(cfg.recipe).is_file() else cfg.recipe
    name = name or "GGUF blocks"
    return name if cfg.dtype == "float32" else f"{cfg.dtype} {name}"


def _nbytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as saved (tied tensors counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(cfg: BenchConfig, engine: str) -> dict:
    """Run inside the engine's own process; returns the figures as a dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if engine == "leanformer":
        from leanformer.engine.generate import generate
        from leanformer.loading import load

        model, _ = load(cfg.model, dtype=cfg.dtype, keep_quantized=cfg.keep_quantized)
        if cfg.recipe:
            from leanformer.compress import apply, load_recipe

            apply(model, load_recipe(cfg.recipe))
        if cfg.activations != "auto":
            from leanformer.compress.qbase import set_activations

            set_activations(model, cfg.activations)
        vocab = model.args.vocab_size
        size = _nbytes(model)

        def run(ids: torch.Tensor, n: int) -> None:
            generate(model, None, ids.tolist(), max_new_tokens=n, ignore_eos=True)

        def steps(ids: torch.Tensor, n: int) -> list[float]:
            return leanformer_decode_steps(model, ids.tolist(), n)

        def prefill(ids: torch.Tensor) -> None:
            with torch.inference_mode():
                model(ids, logits_at=torch.full((len(ids),), ids.shape[1] - 1))
    elif engine == "transformers":
        from leanformer.measure.reference import load_hf_reference

        model, _ = load_hf_reference(cfg.model, cfg.dtype)
        vocab = model.config.vocab_size
        size = _nbytes(model)

        def run(ids: torch.Tensor, n: int, streamer=None) -> None:
            with torch.inference_mode():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0, streamer=streamer,
                )  # fmt: skip

        def steps(ids: torch.Tensor, n: int) -> list[float]:
            # generate() hands the prompt, then each new token, to the streamer as soon as it exists
            stamps = _Stamps()
            run(ids, n, stamps)
            return _step_times(stamps.times[1:])

        def prefill(ids: torch.Tensor) -> None:
            with torch.inference_mode():
                model(ids, logits_to_keep=1)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    load_s = time.perf_counter() - t0
    out: dict = {"engine": engine, "dtype": variant_name(cfg, engine), "activation_dtype": cfg.dtype}
    out |= {"load_s": load_s, "size_mb": size / 2**20}
    one = _prompts(vocab, 1, cfg.prompt_tokens)
    out["prefill_ms"] = 1000 * _median_time(lambda: prefill(one), cfg.repeats)
    out["prefill_tok_s"] = cfg.prompt_tokens / out["prefill_ms"] * 1000
    out["ttft_ms"] = 1000 * _median_time(lambda: run(one, 1), cfg.repeats)
    for b in cfg.batches:
        ids = _prompts(vocab, b, cfg.prompt_tokens)
        n = max(cfg.new_tokens, 2)  # the first token comes with the prefill: 2 make one decode step
        runs = _runs_of_steps(lambda ids=ids, n=n: steps(ids, n), cfg.repeats)
        out[f"decode_tok_s_b{b}"] = decode_rate(runs, b)
        out[f"decode_step_ms_b{b}"] = 1000 * b / out[f"decode_tok_s_b{b}"]
    out["peak_rss_mb"] = _rss_mb()
    out["ceiling_tok_s"] = _bandwidth_ceiling_tok_s(size, cfg.repeats)  # after RSS: it allocates
    return out


class _Stamps:
    """A transformers streamer that only notes when each put() (the prompt, then each step's tokens)
    arrives. Duck-typed rather than subclassing BaseStreamer so that importing this module does not
    import transformers."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


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
        "import json,sys; from leanformer.measure.bench.runner import BenchConfig, measure; "
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
