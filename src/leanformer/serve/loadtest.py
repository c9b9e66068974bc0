"""bench-serve: load-test an OpenAI-compatible server with concurrent streaming requests.

Reports requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL) p50/p99,
as a table and JSON. With `--baseline` the same requests are also sent one at a time, and the ratio of
output tokens/s is what continuous batching buys. Every request asks for exactly `max_tokens` tokens
(greedy, `ignore_eos`), so runs are comparable. Given a model instead of `--url`, a server is started
in a child process (so the load generator does not share its GIL) on a free loopback port.

    leanformer bench-serve smollm2 --requests 16 --concurrency 16 --max-tokens 128 --baseline
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from leanformer.errors import LeanformerError

TOPICS = [
    "a lighthouse keeper", "the history of bread", "how volcanoes form", "a robot learning to paint",
    "the rules of chess", "a trip to the mountains", "why the sky is blue", "a city under the sea",
    "the life of a honeybee", "an old clockmaker", "how to grow tomatoes", "the first airplane",
    "a dragon who was afraid of fire", "the water cycle", "a lost kitten finding home", "the moon landing",
]  # fmt: skip


SYSTEM = (
    "You are a careful storyteller. Keep every story kind, clear and short, with a beginning, a middle "
    "and an end, and name the main character in the first sentence. "
)


def prompts(n: int, prefix_words: int = 0, mixed: bool = False) -> list[str]:
    """n prompts; prefix_words > 0: all start with the same system prompt of about that many words
    (what prefix caching reuses); mixed: prompts of 1×..8× the plain length (some detail repeated)."""
    words = SYSTEM.split()
    prefix = " ".join(words[i % len(words)] for i in range(prefix_words)) + "\n\n" if prefix_words else ""
    out = []
    for i in range(n):
        text = f"Write a short story about {TOPICS[i % len(TOPICS)]}."
        if mixed:
            text += " Make it vivid and detailed." * (2 ** (i % 4) - 1)
        out.append(prefix + text)
    return out


def max_tokens_of(i: int, max_tokens: int, mixed: bool) -> int:
    """Request i's max_tokens: all the same, or (mixed) max_tokens × 1/4, 1/2, 3/4, 1 in turn."""
    return max(1, max_tokens * (1 + (i * 3) % 4) // 4) if mixed else max_tokens


async def _one(client, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    tokens, prompt_tokens, error = 0, 0, None
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", url + path, json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            choice = (event.get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content") if chat else choice.get("text"):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                prompt_tokens = event["usage"]["prompt_tokens"]
    if error or not times:
        return {"error": error or "no tokens"}
    return {
        "ttft": times[0] - t0,
        "itl": list(np.diff(times)),
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "latency": times[-1] - t0,
    }


async def _poll_running(client, url: str, headers: dict, seen: list[float], done: asyncio.Event) -> None:
    """Sample the server's running-request gauge (requests holding KV memory) until `done`."""
    while not done.is_set():
        try:
            r = await client.get(url + "/metrics", headers=headers)
            for line in r.text.splitlines():
                if line.startswith("leanformer_running_requests "):
                    seen.append(float(line.split()[1]))
        except Exception:  # a server without /metrics (not leanformer): no in-flight figures
            return
        await asyncio.sleep(0.05)


async def run_load(
    url: str,
    model_id: str,
    texts: list[str],
    max_tokens: int,
    concurrency: int,
    api_key: str | None = None,
    mixed: bool = False,
    extra: dict | None = None,
) -> dict:
    """Send every prompt (at most `concurrency` in flight, in order); → summary figures. A prompt that is
    a list of messages goes to /v1/chat/completions; `extra`: more body fields (e.g. "speculative")."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    base = {"model": model_id, "temperature": 0, "stream": True}
    base |= {"ignore_eos": True, "stream_options": {"include_usage": True}}

    async def limited(client, i: int, text: str) -> dict:
        async with gate:
            body = base | {"max_tokens": max_tokens_of(i, max_tokens, mixed)} | (extra or {})
            body |= {"messages": text} if isinstance(text, list) else {"prompt": text}
            return await _one(client, url, body, headers)

    limits = httpx.Limits(max_connections=concurrency + 4)
    running: list[float] = []
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        done = asyncio.Event()
        poller = asyncio.create_task(_poll_running(client, url, headers, running, done))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(client, i, t) for i, t in enumerate(texts)))
        wall = time.perf_counter() - t0
        done.set()
        await poller
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in ok)

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q) * 1000) if xs else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens": out_tokens,
        "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in ok])) if ok else float("nan"),
        "output_tok_s": out_tokens / wall,
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p99": pct(itl, 99),
        "ttft_ms_first": ttft[0] * 1000 if ok and ok[0] is results[0] else float("nan"),
        "ttft_ms_rest_p50": pct(ttft[1:], 50),
        "in_flight_max": max(running, default=float("nan")),  # requests holding KV memory at once
        "in_flight_mean": float(np.mean(running)) if running else float("nan"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model: str, serve_args: list[str], timeout: float = 300):
    """`leanformer serve MODEL` in a child process on a free loopback port; yields (url, model id)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "leanformer.cli.main", "serve", model, "--port", str(port)]
    cmd += ["--model-name", "bench", "--log-level", "warning", *serve_args]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LeanformerError(f"the server exited with code {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LeanformerError(f"the server was not ready after {timeout:.0f} s")
            time.sleep(0.25)
        yield url, "bench"
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_serve(args) -> dict:
    """The bench-serve command (args from cli/serve.py's bench-serve parser); prints a table, returns the report."""
    if getattr(args, "speculative", None):
        from leanformer.serve.spec_bench import bench_speculative

        return bench_speculative(args)
    texts = prompts(args.requests, args.prefix_words, args.mixed)
    serve_args = ["--max-batch", str(args.max_batch), "--dtype", args.dtype, *args.serve_args]
    if args.api_key:
        serve_args += ["--api-key", args.api_key]

    def measure(url: str, model_id: str) -> list[dict]:
        runs = []
        asyncio.run(run_load(url, model_id, prompts(2), 8, 2, args.api_key))  # warm-up, no shared prefix
        runs.append(
            run_load(url, model_id, texts, args.max_tokens, args.concurrency, args.api_key, args.mixed)
        )
        if args.baseline:
            runs.append(run_load(url, model_id, texts, args.max_tokens, 1, args.api_key, args.mixed))
        return [asyncio.run(r) for r in runs]

    if args.url:
        rows = measure(args.url.rstrip("/"), args.model_name)
    else:
        if not args.model:
            raise LeanformerError("give a MODEL to serve, or --url of a running server")
        from leanformer.hub import resolve_model

        with server_process(resolve_model(args.model), serve_args) as (url, model_id):
            rows = measure(url, model_id)
    report = {"model": args.model or args.url, "max_tokens": args.max_tokens, "runs": rows}
    if args.baseline:
        report["speedup_output_tok_s"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for r in rows:
        if r["failed"]:
            raise LeanformerError(f"{r['failed']} of {r['requests']} requests failed: {r['errors']}")
    return report


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = ["requests_per_s", "output_tok_s", "ttft_ms_first", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50"]
    keys += ["itl_ms_p99", "in_flight_max", "in_flight_mean"]
    heads = ["req/s", "out tok/s", "TTFT 1st ms", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    heads += ["in flight max", "in flight mean"]
    t = Table(title=f"bench-serve {report['model']}: {report['max_tokens']} tokens per request")
    for h in ["clients", "requests", "failed", *heads]:
        t.add_column(h)
    for r in report["runs"]:
        figures = (f"{r[k]:.2f}" if k == "requests_per_s" else f"{r[k]:.1f}" for k in keys)
        t.add_row(str(r["concurrency"]), str(r["requests"]), str(r["failed"]), *figures)
    console = Console()
    console.width = max(console.width, 120)  # a narrow pipe must not squeeze the figures
    console.print(t)
    if "speedup_output_tok_s" in report:
        print(f"output tokens/s, concurrent vs one at a time: {report['speedup_output_tok_s']:.2f}×")
