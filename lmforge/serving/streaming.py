"""One request's life in the engine, seen from the event loop: the engine thread's events brought onto
the loop, and the request cancelled when its client hangs up, so the engine drops its row before the next
decode step instead of decoding for nobody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request

from lmforge.serving.metrics import ServingMetrics
from lmforge.serving.models import Lease
from lmforge.serving.sampling import Completion, SamplingParams

DISCONNECT_POLL_SECONDS = 0.05  # how soon a request whose client hung up leaves the batch


async def engine_events(
    lease: Lease,
    prompt_ids: list[int],
    params: SamplingParams,
    metrics: ServingMetrics | None,
    deltas: bool = True,
) -> AsyncIterator[Any]:
    """The engine's events for one request, on this event loop; cancels the request if abandoned."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    served = lease.served
    try:
        request = served.engine.submit(
            prompt_ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), deltas
        )
    finally:
        lease.queued()
    if metrics is not None:
        metrics.started(served)
    done = None
    try:
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Completion):
                done = event
            yield event
            if done is not None:
                return
    finally:
        request.cancelled.set()
        if metrics is not None:
            metrics.finished(served, request, done)


async def unless_abandoned(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """The result of work(), or None if the client disconnects first: the work is then cancelled, which
    marks its requests cancelled, and the engine drops their rows before its next decode step. A client
    already gone is never queued."""
    if await request.is_disconnected():
        return None
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        task.cancel()  # a no-op once done; cancels the work if this handler is cancelled itself
