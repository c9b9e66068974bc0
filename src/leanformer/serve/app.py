"""OpenAI-compatible HTTP server over the engine: `leanformer serve MODEL`.

Handlers turn JSON into engine `Request`s and engine `Output`s back into JSON or server-sent events;
they never see a tensor. The engine runs on its own thread (engine/scheduler.py); outputs cross back
to the event loop with `call_soon_threadsafe` onto one asyncio queue per HTTP call.
This module: the routes (create_app) and running them (uvicorn); serve/config.py: ServeConfig and the
server's state; serve/generation.py: completions / chat turned into engine requests and back.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanformer.engine.generate import encode_chat
from leanformer.engine.paged import describe
from leanformer.engine.startup import freeze_startup_objects
from leanformer.errors import LeanformerError
from leanformer.serve.config import ServeConfig, ServerState
from leanformer.serve.gate import Gate
from leanformer.serve.generation import check_generation, check_model, run_generation
from leanformer.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_messages,
    completion_prompts,
    validation_error,
)

__all__ = ["ServeConfig", "ServerState", "create_app", "running", "serve"]  # ServeConfig: re-exported

log = logging.getLogger("leanformer.serve.app")


def create_app(model, tok, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    if cfg.activations != "auto":  # before the engine times or builds anything on the model
        from leanformer.compress import set_activations

        set_activations(model, cfg.activations)
    state = ServerState(model, tok, cfg)

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
        check_generation(state, body)
        prompts = completion_prompts(state.tok, state.model.args.vocab_size, body.prompt)
        return await run_generation(state, http, body, prompts, chat=False, max_tokens=body.max_tokens or 16)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        check_generation(state, body)
        messages = chat_messages(body)  # (its ApiError names the content part: not the template's error)
        try:
            prompt = encode_chat(state.tok, messages)
        except LeanformerError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # the template itself refused (e.g. roles must alternate)
            raise ApiError(400, f"the chat template failed: {e}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await run_generation(state, http, body, [prompt], chat=True, max_tokens=max_tokens)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(state, body.model)
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
    freeze_startup_objects()
    _server(app, host, port, log_level).run()


def _server(app: FastAPI, host: str, port: int, log_level: str):
    """A uvicorn server whose shutdown first drains the engine: stop listening, let in-flight requests
    finish for up to `shutdown_timeout` s, abort the rest (their streams end with an error event and
    [DONE] rather than a cut connection), then let uvicorn close the connections."""
    import uvicorn

    state: ServerState = app.state.lf

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
