"""`leanformer serve` and `leanformer bench-serve`: main.py calls add_parser(subparsers).

bench-serve starts its server in a child process as `python -m leanformer.cli.main serve MODEL ...`.
"""

from __future__ import annotations

import os
from pathlib import Path

from leanformer.errors import LeanformerError
from leanformer.serve.loadtest import add_bench_args


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin, leanformer save) or a known name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="GGUF: Q4_0/Q4_1/Q4_K tensors stay int4, Q8_0/Q5_0/Q6_K int8 in memory",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: MODEL)")
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache slots: requests decoded together")
    p.add_argument("--max-seq", type=int, default=2048, help="tokens per slot: prompt + max_tokens")
    p.add_argument(
        "--kv-budget-mb", type=float, default=2048, help="KV-cache memory cap; fewer slots if it is exceeded"
    )
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per step, between decodes")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting for a slot (beyond --max-batch) before 429",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LEANFORMER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LEANFORMER_API_KEY, else open; "
        "an empty key is refused)",
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="larger request bodies get 413")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120,
        help="seconds one engine step may run before /health answers 503",
    )
    p.add_argument("--request-timeout", type=float, default=600, help="seconds from arrival to last token")
    p.add_argument(
        "--shutdown-timeout", type=float, default=10, help="seconds in-flight requests get on shutdown"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bench-serve", help="load-test a server: requests/s, tokens/s, TTFT, inter-token latency"
    )
    add_bench_args(p)  # the load test's own arguments (serve/loadtest.py)
    p.set_defaults(func=cmd_bench_serve)


def cmd_serve(args) -> None:
    from leanformer.hub import resolve_model

    try:
        from leanformer.serve.app import serve
    except ImportError as e:
        raise LeanformerError(
            f"serving needs FastAPI and uvicorn: pip install 'leanformer[serve]' ({e})"
        ) from None
    path = resolve_model(args.model)
    serve(
        path,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        keep_quantized=args.keep_quantized,
        model_id=args.model_name or (args.model if path != args.model else Path(path).stem),
        log_level=args.log_level,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        kv_budget_mb=args.kv_budget_mb,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        api_key=args.api_key,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_body_mb=args.max_body_mb,
        stall_timeout=args.stall_timeout,
    )


def cmd_bench_serve(args) -> None:
    from leanformer.serve.loadtest import bench_serve

    bench_serve(args)
