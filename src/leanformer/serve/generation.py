"""Completions and chat completions: a checked request body → engine Requests (one per prompt × n,
each with its own seed) submitted together or not at all → a JSON body, or server-sent events.
A non-streaming call whose client goes away cancels its requests."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from leanformer.engine.sampling import SEED_LIMIT, SamplingParams
from leanformer.engine.scheduler import Output, QueueFull, Request, ShuttingDown
from leanformer.errors import LeanformerError
from leanformer.serve.config import ServerState
from leanformer.serve.options import request_speculation
from leanformer.serve.schemas import ApiError, Formatter, Job, collect, new_id, stream_events, unsupported


def check_model(state: ServerState, name: str) -> None:
    if name != state.cfg.model_id:
        raise ApiError(
            404,
            f"model {name!r} not found: this server serves {state.cfg.model_id!r}",
            "model",
            "model_not_found",
        )


def check_generation(state: ServerState, body) -> None:
    check_model(state, body.model)
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


def submit_job(
    state: ServerState, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None
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


async def run_generation(
    state: ServerState, http: HttpRequest, body, prompts, chat: bool, max_tokens: int | None
):
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    job = submit_job(state, body, prompts, max_tokens, logprobs)
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
    watcher = asyncio.create_task(cancel_on_disconnect(http, job))
    try:
        return await collect(job, fmt, head)
    finally:
        watcher.cancel()
        job.cancel()  # no-op for finished requests; frees the others' slots after an error


async def cancel_on_disconnect(http: HttpRequest, job: Job) -> None:
    """Non-streaming calls: the body is read, so the next ASGI message is the client going away."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
