"""OpenAI-compatible HTTP server over the engine: `leanformer serve MODEL`.

Handlers turn JSON into engine `Request`s and engine `Output`s back into JSON or server-sent events;
they never see a tensor. The engine runs on its own thread (engine/scheduler.py); outputs cross back
to the event loop with `call_soon_threadsafe` onto one asyncio queue per HTTP call.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanformer.engine.generate import encode_chat, eos_ids
from leanformer.engine.paged import build_scheduler, describe
from leanformer.engine.runner import Engine
from leanformer.engine.sampling import SEED_LIMIT, SamplingParams
from leanformer.engine.scheduler import Output, QueueFull, Request, Scheduler, ShuttingDown
from leanformer.errors import LeanformerError
from leanformer.serve.gate import Gate
from leanformer.serve.metrics import Metrics
from leanformer.serve.options import attach_speculation, check_options, kv_policy, request_speculation
from leanformer.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Formatter,
    Job,
    TokenText,
    chat_messages,
    collect,
    completion_prompts,
    new_id,
    stream_events,
    unsupported,
    validation_error,
)

log = logging.getLogger("leanformer.serve.app")


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
        check_options(self.window, self.sinks, self.speculative)


class _State:
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


def create_app(model, tok, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    state = _State(model, tok, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is not None:
            state.engine.start()
        yield
        state.closing = True
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, cfg.shutdown_timeout)

    app = FastAPI(title="leanformer", lifespan=lifespan)
    app.state.lf = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else e.detail
        return JSONResponse(ApiError(e.status_code, str(message)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        if state.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.engine is not None and (why := state.engine.problem(cfg.stall_timeout)):
            return JSONResponse({"status": "unhealthy", "reason": why}, status_code=503)
        s = state.scheduler
        return {"status": "ok", "waiting": s.n_waiting if s else 0, "running": s.n_running if s else 0}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            state.metrics.render(state.scheduler), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models():
        card = {"id": cfg.model_id, "object": "model", "created": int(state.metrics.started)}
        card |= {
            "owned_by": "leanformer",
            "max_model_len": state.scheduler.max_seq if state.scheduler else None,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_generation(state, body)
        prompts = completion_prompts(state.tok, state.model.args.vocab_size, body.prompt)
        return await _run(state, http, body, prompts, chat=False, max_tokens=body.max_tokens or 16)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        _check_generation(state, body)
        messages = chat_messages(body)  # (its ApiError names the content part: not the template's error)
        try:
            prompt = encode_chat(state.tok, messages)
        except LeanformerError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # the template itself refused (e.g. roles must alternate)
            raise ApiError(400, f"the chat template failed: {e}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _run(state, http, body, [prompt], chat=True, max_tokens=max_tokens)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        _check_model(state, body.model)
        if not state.is_encoder:
            raise ApiError(
                400,
                "this model does not produce embeddings (serve an encoder, e.g. all-minilm-l6-v2)",
                "model",
            )
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a non-empty list of strings", "input")
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported by this server", "dimensions")
        from leanformer.encoders.embed import embed

        def work():
            with state.embed_lock:  # one batch at a time: the encoder already uses every core
                return embed(state.model, state.tok, texts)

        vectors = await asyncio.to_thread(work)
        limit = getattr(state.model.args, "max_length", None)
        n_tokens = sum(len(ids) for ids in state.tok(texts, truncation=True, max_length=limit)["input_ids"])
        data = []
        for i, v in enumerate(vectors):
            emb = (
                v.tolist()
                if body.encoding_format == "float"
                else base64.b64encode(v.astype("<f4").tobytes()).decode()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": cfg.model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    return app


def _check_model(state: _State, name: str) -> None:
    if name != state.cfg.model_id:
        raise ApiError(
            404,
            f"model {name!r} not found: this server serves {state.cfg.model_id!r}",
            "model",
            "model_not_found",
        )


def _check_generation(state: _State, body) -> None:
    _check_model(state, body.model)
    if state.engine is None:
        raise ApiError(
            400, "this model is an encoder: it gives embeddings (/v1/embeddings), not text", "model"
        )
    if state.closing:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    if state.engine.dead:
        raise ApiError(503, "the engine stopped; the server must be restarted", code="engine_dead")
    if err := unsupported(body):
        raise err


def _submit(
    state: _State, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None
) -> Job:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if stop and state.tok is None:
        raise ApiError(400, "stop strings need a tokenizer; this model has none", "stop")
    stop_ids = frozenset() if body.ignore_eos else state.eos
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(out: Output) -> None:  # engine thread → event loop
        loop.call_soon_threadsafe(queue.put_nowait, out)

    sched, reqs = state.scheduler, []
    speculative = request_speculation(body, state.cfg.speculative, sched)
    if len(prompts) * body.n > sched.capacity:
        raise ApiError(400, f"prompts × n must be ≤ {sched.capacity}", "n")
    for p_i, prompt in enumerate(prompts):
        # OpenAI's chat default: whatever the context leaves
        wanted = max_tokens if max_tokens is not None else max(1, sched.max_seq - len(prompt))
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % SEED_LIMIT  # choice j: its own seed
            try:  # the schema already bounds these: this only names a field the schema let through
                params = SamplingParams(
                    body.temperature, body.top_k, body.top_p, body.repetition_penalty, seed
                )
            except LeanformerError as e:
                raise ApiError(400, str(e), str(e).split()[0], "invalid_value") from None
            try:
                req = Request(
                    prompt, wanted, params, stop, stop_ids, logprobs, state.cfg.request_timeout, emit
                )
                req.index, req.speculative = p_i * body.n + j, speculative
                sched.check(req)
            except LeanformerError as e:
                param = "max_tokens" if len(prompt) < sched.max_seq and max_tokens is not None else None
                raise ApiError(
                    400,
                    str(e),
                    param or ("messages" if hasattr(body, "messages") else "prompt"),
                    "context_length_exceeded",
                ) from None
            reqs.append(req)
    submitted: list[Request] = []
    try:
        for r in reqs:
            state.engine.submit(r)
            submitted.append(r)
    except (QueueFull, ShuttingDown) as e:
        for r in submitted:
            state.engine.cancel(r)
        if isinstance(e, QueueFull):
            raise ApiError(
                429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        raise ApiError(503, str(e), code="shutting_down") from None
    return Job(reqs, queue, state.engine, state.metrics, state.cfg.request_timeout + 30)


async def _run(state: _State, http: HttpRequest, body, prompts, chat: bool, max_tokens: int | None):
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    job = _submit(state, body, prompts, max_tokens, logprobs)
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created}
    head["model"] = state.cfg.model_id
    fmt = Formatter(
        chat, logprobs is not None, state.text_of, sum(len(p) for p in prompts), state.tok is None
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(job, fmt, head, include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(http, job))
    try:
        return await collect(job, fmt, head)
    finally:
        watcher.cancel()
        job.cancel()  # no-op for finished requests; frees the others' slots after an error


async def _cancel_on_disconnect(http: HttpRequest, job: Job) -> None:
    """Non-streaming calls: the body is read, so the next ASGI message is the client going away."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` on a background thread (tests, in-process benchmarks); yields its base URL.

    port=0 takes a free port. Leaving the block stops the server the way Ctrl-C does.
    """
    server = _server(app, host, port, "warning")
    thread = threading.Thread(target=server.run, name="leanformer-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LeanformerError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=app.state.lf.cfg.shutdown_timeout + 30)


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    dtype: str = "float32",
    keep_quantized: bool = True,
    model_id: str | None = None,
    log_level: str = "info",
    **config,
) -> None:
    """Load a model and serve it until Ctrl-C / SIGTERM (then finish or cancel in-flight requests)."""
    from leanformer.loading import load

    cfg = ServeConfig(model_id=model_id or Path(model_path).stem, **config)
    if host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:  # (never "": see ServeConfig)
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    model, tok = load(model_path, dtype=dtype, keep_quantized=keep_quantized)
    app = create_app(model, tok, cfg)
    s = app.state.lf.scheduler
    if s is not None:
        print(describe(s), flush=True)
    _server(app, host, port, log_level).run()


def _server(app: FastAPI, host: str, port: int, log_level: str):
    """A uvicorn server whose shutdown first drains the engine: stop listening, let in-flight requests
    finish for up to `shutdown_timeout` s, abort the rest (their streams end with an error event and
    [DONE] rather than a cut connection), then let uvicorn close the connections."""
    import uvicorn

    state: _State = app.state.lf

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for listener in self.servers:
                listener.close()
            state.closing = True
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown, state.cfg.shutdown_timeout)
            await super().shutdown(sockets)

    # after the drain only the last events are left to write: a short grace suffices
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return Server(config)
