"""`leanformer serve` and `leanformer bench-serve`: main.py calls add_parser(subparsers).

bench-serve starts its server in a child process as `python -m leanformer.cli.main serve MODEL ...`.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.errors import LeanformerError


def add_parser(sub) -> None:
    from leanformer.cli.common import add_activations_flag, add_quantized_flags

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model", help="path (HF folder, .gguf, llama2.c .bin, leanformer save) or a known name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quantized_flags(p)  # GGUF kept quantized by default; --dequantize
    add_activations_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=ck.int_range(0, 65536), default=8000, help="0..65535")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: MODEL)")
    p.add_argument(
        "--max-batch",
        type=ck.positive_int,
        default=16,
        help="requests decoded together (KV slots with --kv-cache slots)",
    )
    p.add_argument(
        "--max-seq", type=ck.int_range(2), default=2048, help="tokens per request: prompt + max_tokens"
    )
    p.add_argument(
        "--kv-budget-mb",
        type=ck.positive_float,
        default=2048,
        help="KV-cache memory cap: fewer blocks (paged) or slots if it is exceeded",
    )
    p.add_argument(
        "--kv-cache",
        default="paged",
        choices=["paged", "slots"],
        help="paged: KV blocks given out by need, with prefix caching (default); slots: one max-seq slot "
        "per request, the fused C++ decode step",
    )
    p.add_argument("--block-size", type=ck.int_range(1, 1025), default=16, help="tokens per KV block (paged)")
    p.add_argument(
        "--kv-blocks",
        type=ck.positive_int,
        default=None,
        help="KV blocks to allocate (paged; default: what --kv-budget-mb holds, ≤ max-batch × max-seq)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="paged: do not reuse the KV blocks of prompt prefixes seen before",
    )
    p.add_argument(
        "--prefill-chunk", type=ck.positive_int, default=256, help="prompt tokens per step, between decodes"
    )
    p.add_argument(
        "--max-queue",
        type=ck.non_negative_int,
        default=256,
        help="requests waiting for a slot (beyond --max-batch) before 429",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LEANFORMER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LEANFORMER_API_KEY, else open; "
        "an empty key is refused)",
    )
    p.add_argument("--max-body-mb", type=ck.positive_float, default=4.0, help="larger request bodies get 413")
    p.add_argument(
        "--stall-timeout",
        type=ck.positive_float,
        default=120,
        help="seconds one engine step may run before /health answers 503",
    )
    p.add_argument(
        "--request-timeout", type=ck.positive_float, default=600, help="seconds from arrival to last token"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=ck.non_negative_float,
        default=10,
        help="seconds in-flight requests get on shutdown",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--replicas",
        type=ck.positive_int,
        default=None,
        metavar="N",
        help="serve N copies of the model as a Ray Serve deployment (requests spread over them; joins "
        "the Ray cluster at $RAY_ADDRESS, else starts a local one); needs pip install 'leanformer[ray]'",
    )
    p.add_argument(
        "--tp",
        type=ck.positive_int,
        default=1,
        metavar="N",
        help="tensor parallel over N processes (rank 0 serves HTTP, every rank runs each forward): "
        "torchrun --standalone --nproc-per-node N -m leanformer serve MODEL --tp N",
    )
    add_window_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bench-serve", help="load-test a server: requests/s, tokens/s, TTFT, inter-token latency"
    )
    add_bench_args(p)
    p.set_defaults(func=cmd_bench_serve)


def add_window_flags(p: argparse.ArgumentParser) -> None:
    """serve's --window / --sinks (engine/windowed.py) and --speculative (engine/spec_batch.py)."""
    p.add_argument(
        "--window", type=ck.positive_int, default=None, metavar="W",
        help="sliding window: each request keeps its --sinks first tokens and newest W, and may run past "
        "the model's context up to --max-seq tokens in bounded memory (static slots)",
    )  # fmt: skip
    p.add_argument("--sinks", type=ck.non_negative_int, default=None, help="with --window: sinks kept (4)")
    p.add_argument(
        "--speculative", choices=["prompt-lookup", "off"], default=None,
        help='default of the request field "speculative": prompt-lookup drafts for greedy requests, '
        "verified in the batch",
    )  # fmt: skip


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """bench-serve's arguments (the load test itself is serve/loadtest.py)."""
    p.add_argument("model", nargs="?", help="start a server on this model (or give --url)")
    p.add_argument("--url", default=None, help="target a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model-name", default="bench", help="the server's model id (with --url)")
    p.add_argument("--api-key", default=os.environ.get("LEANFORMER_API_KEY"))
    p.add_argument("--requests", type=ck.positive_int, default=16)
    p.add_argument("--concurrency", type=ck.positive_int, default=16)
    p.add_argument(
        "--max-tokens", type=ck.positive_int, default=128, help="tokens generated per request (EOS ignored)"
    )
    p.add_argument("--baseline", action="store_true", help="also send the requests one at a time")
    p.add_argument("--max-batch", type=ck.positive_int, default=16, help="for the server bench-serve starts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument(
        "--prefix-words",
        type=ck.non_negative_int,
        default=0,
        help="start every prompt with the same system prompt of this many words (prefix caching)",
    )
    p.add_argument(
        "--mixed",
        action="store_true",
        help="mixed lengths: prompts 1-8x long, max_tokens 1/4..1 of --max-tokens",
    )
    p.add_argument(
        "--speculative", choices=["prompt-lookup"], default=None,
        help="compare speculation on vs off (request field) on input-grounded and open-ended prompts",
    )  # fmt: skip
    p.add_argument("--rounds", type=ck.positive_int, default=2, help="--speculative: on/off rounds")
    p.add_argument("--passages", default=None, help="--speculative: text file whose paragraphs are rewritten")
    p.add_argument(
        "--serve-args",
        default=[],
        type=str.split,
        help="more flags for the server bench-serve starts, as one string: --serve-args='--kv-cache slots --max-seq 1024'",
    )


def cmd_serve(args) -> None:
    from leanformer.hub import resolve_model

    try:
        from leanformer.serve.app import serve
        from leanformer.serve.options import check_options
    except ImportError as e:
        raise LeanformerError(
            f"serving needs FastAPI and uvicorn: pip install 'leanformer[serve]' ({e})"
        ) from None
    _check_kv_args(args)
    check_options(args.window, args.sinks, args.speculative)  # before the model loads
    path = resolve_model(args.model)
    if args.replicas is not None:
        from leanformer.serve.replicas import serve_replicas as serve  # noqa: F811 (same keywords)

        serve = functools.partial(serve, replicas=args.replicas)
    if args.tp > 1:  # under torchrun: rank 0 serves, the others mirror its forwards (serve/tp.py)
        if args.replicas is not None:
            raise LeanformerError(
                "use --tp or --replicas, not both (replicas of a split model are not supported)"
            )
        from leanformer.serve.tp import serve_tp

        serve = functools.partial(serve_tp, tp=args.tp)
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
        kv_cache=args.kv_cache,
        block_size=args.block_size,
        kv_blocks=args.kv_blocks,
        prefix_caching=not args.no_prefix_cache,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        api_key=args.api_key,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_body_mb=args.max_body_mb,
        stall_timeout=args.stall_timeout,
        window=args.window,
        sinks=args.sinks,
        speculative=args.speculative,
        activations=args.activations,
    )


def _check_kv_args(args) -> None:
    """The KV-cache flags that only make sense together, checked before the model loads."""
    if args.kv_cache == "slots" and (args.kv_blocks is not None or args.no_prefix_cache):
        raise LeanformerError("--kv-blocks and --no-prefix-cache apply to --kv-cache paged only; drop them")
    if args.kv_blocks is not None and args.kv_blocks * args.block_size < args.max_seq:
        raise LeanformerError(
            f"--kv-blocks {args.kv_blocks} × --block-size {args.block_size} = "
            f"{args.kv_blocks * args.block_size} tokens cannot hold one request of --max-seq {args.max_seq}: "
            "raise --kv-blocks or lower --max-seq"
        )


def cmd_bench_serve(args) -> None:
    from leanformer.outputs import check_output_file
    from leanformer.serve.loadtest import bench_serve

    if args.json:  # before minutes of load, not after
        check_output_file(args.json, [])
    if args.speculative:  # speculation on vs off on one server (serve/spec_bench.py)
        from leanformer.serve.spec_bench import bench_speculative as bench_serve  # noqa: F811
    bench_serve(args)
