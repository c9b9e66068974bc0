"""The OpenAI wire format for app.py: request schemas, JSON errors, and engine outputs → responses.

Kept apart from app.py so the HTTP handlers read as control flow. Nothing here sees a tensor: engine
`Output`s come in (token ids, text deltas, logprobs, finish reason), JSON and SSE chunks go out.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from leanformer.engine.sampling import SEED_LIMIT


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    TYPES |= {413: "invalid_request_error"}
    TYPES |= {429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- requests: unknown fields are accepted and ignored, as OpenAI clients send many optional ones ----
# Types are strict ("stream": "yes", "max_tokens": true, "prompt": [true] are errors, not coerced), and
# floats must be finite (Python's JSON parser reads NaN and Infinity).


def _real(default: float, **bounds) -> Any:
    return Field(default, strict=True, allow_inf_nan=False, **bounds)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = _real(1.0, ge=0, le=2)  # below 1e-5 it is greedy (engine/sampling.py)
    top_p: float = _real(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    # torch's generator takes < 2^64 and raised on the engine thread beyond; 2^63 fits any client
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float = _real(0.0)
    frequency_penalty: float = _real(0.0)
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    # extensions (as in vLLM: pass with the openai client's extra_body)
    top_k: StrictInt = Field(0, ge=0)
    repetition_penalty: float = _real(1.0, gt=0)
    ignore_eos: StrictBool = False
    speculative: Literal["prompt-lookup", "off"] | None = None  # engine/spec_batch.py; None: the server's


_TokenIds = list[StrictInt]


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | _TokenIds | list[_TokenIds]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # required: a string or a list of content parts (only text parts are served: see chat_messages)
    content: StrictStr | list[dict[str, Any]]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    input: StrictStr | list[StrictStr] | _TokenIds | list[_TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


def unsupported(body: _Sampling) -> ApiError | None:
    """The OpenAI fields we accept only at their neutral value: say so instead of silently ignoring."""
    checks = [
        ("presence_penalty", body.presence_penalty != 0, "use repetition_penalty (extra_body)"),
        ("frequency_penalty", body.frequency_penalty != 0, "use repetition_penalty (extra_body)"),
        ("logit_bias", bool(body.logit_bias), ""),
    ]
    if isinstance(body, CompletionRequest):
        checks += [
            ("echo", body.echo, ""),
            ("suffix", bool(body.suffix), ""),
            ("best_of", body.best_of not in (None, body.n), ""),
        ]
    if isinstance(body, ChatRequest):
        checks.append(("tools", bool(body.tools), ""))
        kind = (body.response_format or {}).get("type", "text")
        checks.append(("response_format", kind != "text", 'only {"type": "text"}'))
    for name, bad, hint in checks:
        if bad:
            return ApiError(
                400, f"{name} is not supported by this server" + (f"; {hint}" if hint else ""), name
            )
    if isinstance(body.stop, list) and len(body.stop) > 4:
        return ApiError(400, "stop takes at most 4 sequences", "stop")
    return None


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's RequestValidationError → a 400 naming the first offending field."""
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {e.get('msg', '')}", None, "invalid_json")
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # unions report the member type tried (e.g. "str"); keep only field names and list indices
    loc = [p for p in loc if p.isdigit() or p.isidentifier() and p not in ("str", "int", "list", "dict")]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    return ApiError(400, f"{param}: {msg}" if param else msg, param, "invalid_value")


# ---- prompts ----


def completion_prompts(tok, vocab: int, prompt) -> list[list[int]]:
    """OpenAI's prompt forms (text, token ids, or a list of either) → one token-id list per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if tok is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
            p = list(tok.encode(p))
        if not p:
            raise ApiError(400, "prompt has no tokens", "prompt")
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        out.append(list(p))
    return out


def chat_messages(body: ChatRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                raise ApiError(400, "only text content parts are supported", f"messages.{i}.content")
            content = "\n".join(part["text"] for part in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


# ---- responses ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """Token id → its text for logprobs (cached: the same few thousand ids come back all the time)."""

    def __init__(self, tok) -> None:
        self.tok, self.cache = tok, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            text = f"token_id:{token_id}" if self.tok is None else self.tok.decode([token_id])
            self.cache[token_id] = text
        return self.cache[token_id]


def completion_logprobs(lps, text_of: TokenText, offset: int) -> dict:
    """Legacy completions format; `offset` is where this piece's text starts in the choice's text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        token = text_of(lp.token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({text_of(t): v for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def chat_logprobs(lps, text_of: TokenText) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        token = text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(*t) for t in lp.top]} for lp in lps]


# ---- engine outputs → OpenAI responses ----

_FAILED = {"timeout": 504, "abort": 503, "error": 500}


def failure(out) -> ApiError:
    message = {
        "timeout": "the request did not finish within the server's request timeout",
        "abort": "the server is shutting down",
        "error": out.error or "internal error",
    }[out.finish_reason]
    return ApiError(_FAILED[out.finish_reason], message, code=out.finish_reason)


class Job:
    """The engine requests behind one HTTP call, the queue their outputs arrive on, and latency metrics."""

    POLL_S = 1.0  # how often a waiting call checks that the engine thread is still alive

    def __init__(self, reqs: list, queue: asyncio.Queue, engine, metrics, watchdog_s: float) -> None:
        self.reqs, self.queue, self.engine, self.metrics = reqs, queue, engine, metrics
        self.watchdog_s = watchdog_s  # the engine enforces timeouts; this guards against a stuck engine
        self.arrived = time.monotonic()
        self.last: dict[int, float] = {}

    async def outputs(self) -> AsyncIterator:
        pending, m = len(self.reqs), self.metrics
        while pending:
            out = await self._next()
            now = time.monotonic()
            if out.token_ids:
                prev = self.last.get(out.index)
                if prev is None:
                    m.ttft.observe(now - self.arrived)
                else:
                    m.itl.observe(now - prev)
                self.last[out.index] = now
            if out.finish_reason is not None:
                pending -= 1
                m.e2e.observe(now - self.arrived)
            yield out

    async def _next(self):
        """The next output; an error as soon as the engine thread is found dead (nothing would come), and
        a 504 after `watchdog_s` without output (a stuck engine)."""
        # one get() kept across polls: cancelling and re-making it could drop an output in between
        getter = asyncio.ensure_future(self.queue.get())
        waited = 0.0
        try:
            while True:
                wait = min(self.POLL_S, self.watchdog_s - waited)
                done, _ = await asyncio.wait({getter}, timeout=wait)
                if done:
                    return getter.result()
                waited += wait
                if getattr(self.engine, "dead", False):
                    raise ApiError(
                        503, "the engine stopped; the server must be restarted", code="engine_dead"
                    )
                if waited >= self.watchdog_s:
                    raise ApiError(504, "the engine did not answer in time", code="timeout")
        finally:
            getter.cancel()  # no-op when it is done

    def cancel(self) -> None:
        for r in self.reqs:
            self.engine.cancel(r)


@dataclass
class Formatter:
    chat: bool
    want_logprobs: bool
    text_of: TokenText
    prompt_tokens: int
    token_ids: bool = False  # add "token_ids" to each choice: for models without a tokenizer (no text)

    def logprobs(self, lps: list, offset: int) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": chat_logprobs(lps, self.text_of)}
        return completion_logprobs(lps, self.text_of, offset)


async def collect(job: Job, fmt: Formatter, head: dict) -> dict:
    """A whole (non-streaming) response; raises ApiError when a choice failed (timeout, shutdown)."""
    texts: dict[int, list[str]] = {r.index: [] for r in job.reqs}
    ids: dict[int, list[int]] = {r.index: [] for r in job.reqs}
    lps: dict[int, list] = {r.index: [] for r in job.reqs}
    finish: dict[int, str] = {}
    completion_tokens = 0
    async for out in job.outputs():
        if out.finish_reason in _FAILED:
            raise failure(out)
        texts[out.index].append(out.text)
        ids[out.index] += out.token_ids
        lps[out.index] += out.logprobs or []
        if out.finish_reason is not None:
            finish[out.index] = out.finish_reason
            completion_tokens += out.completion_tokens
    choices = []
    for i in sorted(texts):
        text = "".join(texts[i])
        choice: dict = {"index": i}
        if fmt.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": fmt.logprobs(lps[i], 0), "finish_reason": finish.get(i, "stop")}
        if fmt.token_ids:
            choice["token_ids"] = ids[i]
        choices.append(choice)
    return head | {"choices": choices, "usage": usage(fmt.prompt_tokens, completion_tokens)}


async def stream_events(job: Job, fmt: Formatter, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format. Starlette cancels this generator when the client
    disconnects; `finally` then frees the requests' slots at the engine's next step."""
    head = head | {"object": "chat.completion.chunk" if fmt.chat else "text_completion"}
    offsets: dict[int, int] = {}
    completion_tokens = 0
    try:
        if fmt.chat:
            for r in job.reqs:
                first = {"index": r.index, "delta": {"role": "assistant", "content": ""}}
                yield sse(head | {"choices": [first | {"logprobs": None, "finish_reason": None}]})
        failed = False
        try:
            async for out in job.outputs():
                if out.finish_reason in _FAILED:
                    yield sse(failure(out).body())
                    failed = True
                    break
                if not (
                    out.text or out.finish_reason or ((fmt.token_ids or fmt.want_logprobs) and out.token_ids)
                ):
                    continue  # text held back (half a character, a possible stop string)
                choice: dict = {"index": out.index}
                if fmt.chat:
                    choice["delta"] = {"content": out.text} if out.text else {}
                else:
                    choice["text"] = out.text
                offset = offsets.get(out.index, 0)
                offsets[out.index] = offset + len(out.text)
                choice |= {
                    "logprobs": fmt.logprobs(out.logprobs or [], offset),
                    "finish_reason": out.finish_reason,
                }
                if out.finish_reason is not None:
                    completion_tokens += out.completion_tokens
                yield sse(head | {"choices": [choice]})
        except ApiError as e:  # the engine died or stalled: say so rather than cut the stream
            yield sse(e.body())
            failed = True
        if include_usage and not failed:
            yield sse(head | {"choices": [], "usage": usage(fmt.prompt_tokens, completion_tokens)})
        yield sse("[DONE]")
    finally:
        job.cancel()
