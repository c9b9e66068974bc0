"""`bench-serve --speculative prompt-lookup`: concurrent streams with speculation on vs off, one server.

The same requests run with the request field "speculative" set to "off" and to the method, alternately,
round after round, on one server (so both see the same machine load and caches); the report gives, per
workload, the median output tokens/s of each and their ratio, and the server's acceptance rate
(from /metrics) over the speculative runs. Workloads (measure/bench/speculative.py's prompts):
input-grounded (rewrite a passage: the reply copies the prompt, where prompt lookup helps) and
open-ended (write a story: little to copy; speculation must not cost much). A model with a chat
template gets chat requests (/v1/chat/completions), one without gets the text as a completion prompt.

    leanformer bench-serve smollm2 --speculative prompt-lookup --concurrency 4 --requests 8 --max-tokens 128
"""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path

from leanformer.errors import LeanformerError
from leanformer.measure.bench.speculative import GROUNDED, OPEN, STORY_TOPICS, passages
from leanformer.serve.loadtest import run_load, server_process


def workloads(n: int, passages_file: str | None, chat: bool) -> dict[str, list]:
    texts = {
        "input-grounded": [GROUNDED.format(passage=p) for p in passages(passages_file, n)],
        "open-ended": [OPEN.format(topic=STORY_TOPICS[i % len(STORY_TOPICS)]) for i in range(n)],
    }
    return {w: [[{"role": "user", "content": t}] if chat else t for t in ts] for w, ts in texts.items()}


def _speculation_counters(url: str, headers: dict) -> tuple[float, float]:
    """(drafted, accepted) tokens so far, from the server's /metrics."""
    import httpx

    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    found = {}
    for line in text.splitlines():
        for name in ("leanformer_spec_draft_tokens_total", "leanformer_spec_accepted_tokens_total"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    if len(found) < 2:
        raise LeanformerError(f"{url} reports no speculative decoding counters: is it a leanformer server?")
    return found["leanformer_spec_draft_tokens_total"], found["leanformer_spec_accepted_tokens_total"]


def _chat_works(url: str, model_id: str, headers: dict) -> bool:
    import httpx

    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return (
        httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120).status_code == 200
    )


def measure(url: str, model_id: str, args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    chat = _chat_works(url, model_id, headers)
    loads = workloads(args.requests, args.passages, chat)
    method = args.speculative
    out = {}
    for name, texts in loads.items():
        asyncio.run(run_load(url, model_id, texts[:2], 8, 2, args.api_key))  # warm-up
        speeds: dict[str, list[float]] = {"off": [], method: []}
        drafted = accepted = 0.0
        for _ in range(args.rounds):
            for mode in ("off", method):
                before = _speculation_counters(url, headers)
                r = asyncio.run(
                    run_load(url, model_id, texts, args.max_tokens, args.concurrency, args.api_key,
                             extra={"speculative": mode})
                )  # fmt: skip
                if r["failed"]:
                    raise LeanformerError(f"{r['failed']} of {r['requests']} requests failed: {r['errors']}")
                after = _speculation_counters(url, headers)
                speeds[mode].append(r["output_tok_s"])
                if mode != "off":
                    drafted += after[0] - before[0]
                    accepted += after[1] - before[1]
        off, on = statistics.median(speeds["off"]), statistics.median(speeds[method])
        out[name] = {
            "off_tok_s": speeds["off"],
            "on_tok_s": speeds[method],
            "speedup": on / off,
            "acceptance": accepted / drafted if drafted else 0.0,
            "drafted": drafted,
        }
    return out


def bench_speculative(args) -> dict:
    passages(args.passages, 1)  # a missing file fails before the server starts
    serve_args = ["--max-batch", str(args.max_batch), "--dtype", args.dtype, *args.serve_args]
    if args.api_key:
        serve_args += ["--api-key", args.api_key]
    if args.url:
        results = measure(args.url.rstrip("/"), args.model_name, args)
    else:
        if not args.model:
            raise LeanformerError("give a MODEL to serve, or --url of a running server")
        from leanformer.hub import resolve_model

        with server_process(resolve_model(args.model), serve_args) as (url, model_id):
            results = measure(url, model_id, args)
    report = {
        "model": args.model or args.url,
        "method": args.speculative,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "workloads": results,
    }
    for name, r in results.items():
        print(
            f"{name}: {args.concurrency} streams, output tokens/s off {statistics.median(r['off_tok_s']):.1f}, "
            f"{args.speculative} {statistics.median(r['on_tok_s']):.1f} ({r['speedup']:.2f}×), "
            f"acceptance {r['acceptance']:.2f} of {r['drafted']:.0f} drafted"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report
