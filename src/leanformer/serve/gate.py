"""ASGI middleware in front of app.py's routes: the API key, the request-body size limit, and request
counts by endpoint and status for /metrics. Apart from app.py to keep that file to the handlers."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from leanformer.serve.schemas import ApiError

ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/health",
    "/metrics",
)


class Gate:
    """`state` is serve/config.py's ServerState: reads cfg.api_key, cfg.max_body_mb and writes metrics.requests."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def refuse(err: ApiError) -> None:
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, counting_send)

        try:
            cfg = self.state.cfg
            if cfg.api_key is not None and path.startswith("/v1/") and not authorized(scope, cfg.api_key):
                msg = "missing or invalid API key: send 'Authorization: Bearer <key>'"
                return await refuse(ApiError(401, msg, code="invalid_api_key"))
            if scope["method"] in ("POST", "PUT", "PATCH"):
                limit = int(cfg.max_body_mb * 2**20)
                body = await _read_body(scope, receive, limit)
                if body is None:
                    status = 499  # the client went away while sending (nginx's code for it)
                    return
                if isinstance(body, ApiError):
                    return await refuse(body)
                receive = _replay(body, receive)
            await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.requests[(endpoint, status)] += 1


def authorized(scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, given = header.partition(b" ")
    # compared as bytes in constant time (no timing oracle on how much of the key matched), and
    # always compared, whatever the scheme
    same = hmac.compare_digest(given.strip(), key.encode())
    return same and scheme.lower() == b"bearer"


async def _read_body(scope, receive, limit: int) -> bytes | ApiError | None:
    """The whole body, an ApiError 413 as soon as it is known to exceed `limit` bytes (from
    Content-Length before reading, else while reading a chunked body), or None if the client left."""
    too_big = ApiError(
        413,
        f"the request body is larger than this server's limit of {limit / 2**20:g} MB (--max-body-mb)",
        code="request_too_large",
    )
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return too_big
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then passes on (e.g. the disconnect that
    app.py's non-streaming handlers wait for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
