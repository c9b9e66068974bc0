"""`torchrun --standalone --nproc-per-node N -m leanformer serve MODEL --tp N`: one server over N ranks.

Every rank loads MODEL and keeps its tensor-parallel shard (distributed/tensor_parallel.py). Rank 0
runs the HTTP server and the scheduler on a `Leader` (distributed/mirror.py), which broadcasts each
engine forward (prefill chunks and decode batches: token ids, slots, logit positions, cache lengths
and block tables) before running it; ranks 1..N-1 build the same KV cache (the same app, never
started) and run every forward they receive on their shard. Sampling, detokenizing and everything
HTTP stay on rank 0, so greedy completions equal the one-process server's. On shutdown rank 0 drains
the requests in flight (the other ranks keep serving its forwards meanwhile), then sends stop.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from leanformer.errors import LeanformerError
from leanformer.serve.app import ServeConfig, _server, create_app

log = logging.getLogger("leanformer.serve.tp")


def serve_tp(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    tp: int,
    dtype: str = "float32",
    keep_quantized: bool = True,
    model_id: str | None = None,
    log_level: str = "info",
    **config,
) -> None:
    """serve() with the model split over the `tp` ranks torchrun started (run on every rank)."""
    from leanformer.distributed import check_tp, join, parallelize_
    from leanformer.distributed.mirror import Leader, follow
    from leanformer.engine.paged import describe
    from leanformer.loading import load

    cfg = ServeConfig(model_id=model_id or Path(model_path).stem, **config)  # bad flags: before the group
    rank, _ = join(tp)
    model, tok = load(model_path, dtype=dtype, keep_quantized=keep_quantized)
    if getattr(model, "family", "") == "bert":
        raise LeanformerError("serve --tp splits decoder LMs; serve an encoder without --tp")
    check_tp(model.args.num_key_value_heads, tp, "--tp")
    parallelize_(model)
    if rank != 0:
        # Ctrl-C / SIGTERM are for rank 0, which drains its requests (needing this rank's forwards)
        # and then sends stop; a rank 0 that dies instead breaks the broadcast and ends this loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        follow(model, create_app(model, tok, cfg).state.lf.scheduler.cache)
        return
    if host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    # uvicorn re-raises the signal that stopped it once it has drained; the default SIGTERM action
    # would then end this process before `finally` tells the other ranks to stop
    signal.signal(signal.SIGTERM, _exit)
    leader = Leader(model)
    try:
        app = create_app(leader, tok, cfg)
        print(f"{describe(app.state.lf.scheduler)}; tensor parallel over {tp} ranks", flush=True)
        _server(app, host, port, log_level).run()
    finally:
        leader.stop()


def _exit(signum, frame) -> None:
    raise SystemExit(0)  # after a drained shutdown: unwinds through serve_tp's `finally`
