"""Pure ASGI middlewares, so they guard every route, mounted apps included, before any body is parsed:
health probes, API keys, the queue bound, JSON only, and the body's size. Each refusal is counted by
reason (`refuse`) and answered in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lmforge.serving.auth import OPEN_PATHS, authorized
from lmforge.serving.protocol import error_body

if TYPE_CHECKING:  # the vLLM service uses these middlewares without the builtin engine's torch
    from lmforge.serving.models import ServedModels

Refuse = Callable[[str], None]  # counts a refusal by its reason
GENERATING_PATHS = ("/generate", "/predict", "/v1/completions", "/v1/chat/completions")
RETRY_AFTER_SECONDS = 1

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


async def _send_error(
    send, status: int, payload: dict, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A JSON error response from a middleware, before any route runs."""
    await send(
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"connection", b"close"), *headers]}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


class ApiKeys:
    """With API keys set, every route but the health probes answers 401 in OpenAI's shape unless the
    request carries `Authorization: Bearer <key>` (auth.py). Checked before the body is read."""

    def __init__(self, app, keys: list[str], refuse: Refuse):
        self.app, self.keys, self.refuse = app, keys, refuse

    async def __call__(self, scope, receive, send):
        if self.keys and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
            if not authorized(header, self.keys):
                self.refuse("unauthorized")
                why = "a missing API key" if header is None else "an invalid API key"
                payload = error_body(f"{why}: send Authorization: Bearer <key>", "invalid_api_key")
                return await _send_error(send, 401, payload, ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)


def overloaded_body(max_queue: int) -> dict:
    return error_body(
        f"the server is at capacity ({max_queue} requests waiting): retry after {RETRY_AFTER_SECONDS} s",
        "server_overloaded",
    )


RETRY_HEADERS = {"retry-after": str(RETRY_AFTER_SECONDS)}  # with every 429, whoever sends it


def is_generating(scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATING_PATHS


class Queue(Protocol):
    def waiting(self) -> int: ...


class Backpressure:
    """A generating request that finds serve.max_queue rows already waiting for the engine gets a 429
    with Retry-After at once (the /v1 routes also count a request's n choices before queueing any)."""

    def __init__(self, app, queue: Queue, max_queue: int, refuse: Refuse):
        self.app, self.queue, self.max_queue, self.refuse = app, queue, max_queue, refuse

    async def __call__(self, scope, receive, send):
        if is_generating(scope) and self.queue.waiting() >= self.max_queue:
            self.refuse("overloaded")
            headers = tuple((k.encode(), v.encode()) for k, v in RETRY_HEADERS.items())
            return await _send_error(send, 429, overloaded_body(self.max_queue), headers)
        await self.app(scope, receive, send)


class InFlight:
    """The queue of an engine in another process (vLLM): the generating requests between arrival and
    the end of their response, of which the first `running` decode and the rest wait. Counts requests,
    not their n choices."""

    def __init__(self, running: int):
        self.running, self.count = running, 0

    def waiting(self) -> int:
        return max(0, self.count - self.running)


class CountInFlight:
    def __init__(self, app, in_flight: InFlight):
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope, receive, send):
        if not is_generating(scope):
            return await self.app(scope, receive, send)
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1


class JsonOnly:
    """Refuse form bodies with a 415. Every route here takes JSON, but BentoML would parse a form into
    fields for /generate (and answer a malformed one with a 500)."""

    def __init__(self, app, refuse: Refuse):
        self.app, self.refuse = app, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            # every content-type header: BentoML reads the first, a dict() of them keeps the last
            types = [
                v.split(b";")[0].strip().lower()
                for k, v in scope.get("headers") or []
                if k == b"content-type"
            ]
            if any(t in FORM_TYPES for t in types):
                payload = error_body(
                    "the request body must be JSON (application/json)", "unsupported_media_type"
                )
                self.refuse("unsupported_media_type")
                return await _send_error(send, 415, payload)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int, refuse: Refuse):
        self.app, self.max_bytes, self.refuse = app, max_bytes, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send)
        # Read the body now (at most max_bytes, so a chunked body cannot grow without bound), then
        # replay it; later receive() calls still report a client disconnect.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        self.refuse("too_large")
        payload = error_body(f"request body larger than {self.max_bytes} bytes", "request_too_large")
        await _send_error(send, 413, payload)


class Health:
    """vLLM's GET /health: 200 with an empty body once the model is loaded, 503 before. If the engine's
    decoding thread has died, /health, /livez and /readyz all answer 503, so that an orchestrator takes
    the worker out of service and replaces it."""

    def __init__(self, app, models: ServedModels):
        self.app, self.models = app, models

    async def __call__(self, scope, receive, send):
        probe = scope["type"] == "http" and scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")
        stopped = not self.models.alive
        if probe and (scope["path"] == "/health" or stopped):
            await send({"type": "http.response.start", "status": 200 if self.models.ready and not stopped else 503,
                        "headers": [(b"content-length", b"0")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)
