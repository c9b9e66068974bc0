"""The server's settings (`ServeConfig`, validated when built) and its state (`ServerState`: the model,
the scheduler and engine thread for a decoder, metrics, the shutdown flag), shared by the app, the gate
and the request handlers."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from leanformer.engine.generate import eos_ids
from leanformer.engine.paged import build_scheduler
from leanformer.engine.runner import Engine
from leanformer.engine.scheduler import Scheduler
from leanformer.errors import LeanformerError
from leanformer.kernels.cpu import ACTIVATIONS
from leanformer.serve.metrics import Metrics
from leanformer.serve.options import attach_speculation, check_options, kv_policy
from leanformer.serve.schemas import TokenText


@dataclass
class ServeConfig:
    model_id: str = "leanformer"
    max_batch: int = 16  # KV-cache slots = requests decoded together (fewer if kv_budget_mb says so)
    max_seq: int = 2048  # tokens per slot: prompt + max_tokens of one request
    kv_budget_mb: float | None = 2048.0
    prefill_chunk: int = 256  # prompt tokens per engine step (padded), interleaved with decode steps
    max_queue: int = 256  # requests waiting for a slot (beyond the max_batch running) before 429
    api_key: str | None = None  # None: open; an empty key is refused (it would let `Bearer ` in)
    request_timeout: float = 600.0  # seconds from arrival to the last token
    shutdown_timeout: float = 10.0
    max_body_mb: float = 4.0  # larger request bodies get 413 (a 2048-token prompt is ~10 kB of JSON)
    stall_timeout: float = 120.0  # one engine step running longer than this: /health says 503
    # "paged": KV blocks shared out by need, with prefix caching (engine/paged.py); "slots": one
    # max_seq-token slot per request (engine/scheduler.py), the C++ fused decode step
    kv_cache: str = "paged"
    block_size: int = 16  # tokens per KV block
    kv_blocks: int | None = None  # blocks to allocate; None: what kv_budget_mb holds (≤ max_batch × max_seq)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before
    window: int | None = None  # sliding window + sinks per request (serve/options.py); None: off
    sinks: int | None = None  # with window: first tokens kept (None: 4)
    speculative: str | None = None  # default of the request field "speculative" ("prompt-lookup")
    activations: str = (
        "auto"  # int4 / int8 Linears on "int8" or "fp32" activations (compress.set_activations)
    )

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not key.strip():
            raise LeanformerError(
                "the API key is empty (--api-key '' or LEANFORMER_API_KEY=''): "
                "give a real key, or unset it to serve without one"
            )
        if key is not None and key != key.strip():
            raise LeanformerError(
                "the API key starts or ends with whitespace, which HTTP headers cannot carry"
            )
        if not self.max_body_mb > 0:
            raise LeanformerError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if self.kv_cache not in ("paged", "slots"):
            raise LeanformerError(f"--kv-cache must be paged or slots, got {self.kv_cache!r}")
        if not 1 <= self.block_size <= 1024 or (self.kv_blocks is not None and self.kv_blocks < 1):
            raise LeanformerError("--block-size must be in 1..1024 and --kv-blocks ≥ 1")
        if self.activations not in ACTIVATIONS:
            raise LeanformerError(
                f"--activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )
        check_options(self.window, self.sinks, self.speculative)


class ServerState:
    """What the routes share: model, tokenizer, settings, the scheduler + engine thread (decoders only),
    metrics, the embedding lock and the shutdown flag."""

    def __init__(self, model, tok, cfg: ServeConfig) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.is_encoder = getattr(model, "family", "") == "bert"
        self.scheduler: Scheduler | None = None
        self.engine: Engine | None = None
        if not self.is_encoder:
            policy = kv_policy(cfg.window, cfg.sinks)
            self.scheduler = build_scheduler(
                model, tok, cfg.kv_cache, cfg.max_batch, cfg.max_seq, cfg.kv_budget_mb, cfg.kv_blocks,
                cfg.block_size, cfg.prefix_caching, cfg.prefill_chunk, cfg.max_queue, policy,
            )  # fmt: skip
            attach_speculation(self.scheduler, policy)
            self.engine = Engine(self.scheduler)
        self.metrics = Metrics()
        self.text_of = TokenText(tok)
        self.eos = frozenset(eos_ids(model, tok))
        self.embed_lock = threading.Lock()
        self.closing = False
