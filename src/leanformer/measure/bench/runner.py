"""`leanformer bench`: prefill and decode speed, time to first token, peak RSS and size.

Our engines (and HF transformers) as peer_worker.py's protocol serves them: each in its own process
(so peak RSS is its own), taking turns with the peers round by round (turns.py), on the same weights and
the same random prompts. Decode speed is measured the same way for every engine: each decode step (one
new token per row, after the prefill) is timed on its own while the engine generates N tokens, and
tokens/s = batch / the median step over all rounds' generations, after a warm-up. A median of steps is
what one slow run or a stall on a shared machine cannot move; the earlier (t_N − t_1) / (N − 1) scheme
subtracted two noisy medians and once doubled a headline figure. Prefill and time to first token are
the median over rounds of one whole run each.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# also what paired, bench_tp and the tests take from here
from leanformer.measure.bench.turns import bandwidth_ceiling_tok_s, decode_rate  # noqa: F401


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
    calibration: str | None = None  # text file the recipe calibrates on (GPTQ, AWQ, Wanda, ...; ours only)
    calibration_samples: int = 16
    calibration_len: int = 512


def _prompts(vocab: int, batch: int, length: int) -> torch.Tensor:
    """The random prompt ids every engine gets, peers included (peer_worker.py has no torch)."""
    from leanformer.measure.bench.peer_worker import prompts

    return torch.tensor(prompts(vocab, batch, length))


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


class LeanformerEngine:
    """Our engine for turns.py's protocol (peer_worker.Engine's methods): MODEL loaded as configured."""

    def __init__(self, cfg: BenchConfig) -> None:
        from leanformer.loading import load

        model, tok = load(cfg.model, dtype=cfg.dtype, keep_quantized=cfg.keep_quantized)
        if cfg.recipe:
            from leanformer.compress import apply, load_recipe
            from leanformer.measure.evaluate import calibration_ids

            ids = None
            if cfg.calibration:
                ids = calibration_ids(tok, cfg.calibration, cfg.calibration_samples, cfg.calibration_len)
            apply(model, load_recipe(cfg.recipe), calibration=ids, progress=False)
        if cfg.activations != "auto":
            from leanformer.compress.qbase import set_activations

            set_activations(model, cfg.activations)
        self.model, self.vocab, self.size_bytes = model, model.args.vocab_size, _nbytes(model)

    def prefill(self, ids: list[list[int]]) -> None:
        t = torch.tensor(ids)
        with torch.inference_mode():
            self.model(t, logits_at=torch.full((len(ids),), t.shape[1] - 1))

    def first_token(self, ids: list[list[int]]) -> None:
        from leanformer.engine.generate import generate

        generate(self.model, None, ids, max_new_tokens=1, ignore_eos=True)

    def steps(self, ids: list[list[int]], n: int) -> list[float]:
        return leanformer_decode_steps(self.model, ids, n)


class TransformersEngine:
    """HF transformers on the same weights (measure/reference.py), greedy `generate`."""

    def __init__(self, cfg: BenchConfig) -> None:
        from leanformer.measure.reference import load_hf_reference

        self.model, _ = load_hf_reference(cfg.model, cfg.dtype)
        self.vocab, self.size_bytes = self.model.config.vocab_size, _nbytes(self.model)

    def _generate(self, ids: list[list[int]], n: int, streamer=None) -> None:
        t = torch.tensor(ids)
        with torch.inference_mode():
            self.model.generate(
                t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0, streamer=streamer,
            )  # fmt: skip

    def prefill(self, ids: list[list[int]]) -> None:
        with torch.inference_mode():
            self.model(torch.tensor(ids), logits_to_keep=1)

    def first_token(self, ids: list[list[int]]) -> None:
        self._generate(ids, 1)

    def steps(self, ids: list[list[int]], n: int) -> list[float]:
        # generate() hands the prompt, then each new token, to the streamer as soon as it exists
        stamps = _Stamps()
        self._generate(ids, n, stamps)
        return _step_times(stamps.times[1:])


ENGINES = {"leanformer": LeanformerEngine, "transformers": TransformersEngine}


def make_engine(cfg: BenchConfig, engine: str):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return ENGINES[engine](cfg)


def serve_engine(cfg_json: str, engine: str) -> None:
    """The child process of one of our engines: peer_worker.serve's loop around make_engine."""
    from leanformer.measure.bench.peer_worker import serve

    cfg = BenchConfig(**json.loads(cfg_json))
    serve(lambda: make_engine(cfg, engine), asdict(cfg))


def contender(cfg: BenchConfig, engine: str, label: str | None = None, *, in_process: bool = False):
    """A turns.Contender for one of our engines: a child process, or this one (`in_process`)."""
    from leanformer.measure.bench import turns

    row = {"engine": engine, "label": label or engine, "dtype": variant_name(cfg, engine)}
    row["activation_dtype"] = cfg.dtype
    if in_process:

        def start():
            conn = turns.InProcess(lambda: make_engine(cfg, engine), asdict(cfg))
            return conn, conn.ready

        return turns.Contender(row, start)
    code = "import sys; from leanformer.measure.bench.runner import serve_engine; serve_engine(*sys.argv[1:])"
    argv = [sys.executable, "-c", code, json.dumps(asdict(cfg)), engine]
    return turns.Contender(row, turns.start_process(argv, f"{engine} benchmark"))


def _one(cfg: BenchConfig, engine: str, in_process: bool) -> dict:
    from leanformer.measure.bench.turns import take_turns

    row = take_turns(cfg, [contender(cfg, engine, in_process=in_process)])[0]
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def measure(cfg: BenchConfig, engine: str) -> dict:
    """One engine's figures, measured in this process (tests; bench_tp's split model has its own)."""
    return _one(cfg, engine, in_process=True)


def run_engine(cfg: BenchConfig, engine: str) -> dict:
    """One engine's figures, measured in a fresh Python process (its peak RSS its own)."""
    return _one(cfg, engine, in_process=False)


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
