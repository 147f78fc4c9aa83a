"""`GET /queue/{app}/requests/{id}/status/stream`: a request's status as server-sent events (fal's streaming mode).

Each event is `data: <status JSON>` in the polling route's shape (`status`, `queue_position`, `logs`, and on
COMPLETED `metrics`, `error`, `error_type`) plus fal's `request_id`, `response_url`, `status_url` and `cancel_url`.
An event is sent at once and then whenever the status changes (queue position, state, a new log line when logs are
asked for with `?logs=1|true`); the stream ends after the COMPLETED event (the JS client's `subscribe(..., {mode:
"streaming"})` and `queue.streamStatus` stop there). A comment line keeps an idle connection alive; a client that
goes away ends the generator (the job itself runs on: only the watcher left).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from ..runtime.queue import Job, JobQueue
from ..service import job_status, status_json, wait_change_async

KEEPALIVE_S = 15.0
T = TypeVar("T")


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


async def status_events(job: Job, queue: JobQueue, *, with_logs: bool, urls: dict[str, str],
                        disconnected: Callable[[], Awaitable[bool]] | None = None,
                        poll_s: float = 1.0) -> AsyncIterator[str]:
    """SSE lines for `job`'s status until COMPLETED (inclusive)."""
    last: dict[str, Any] | None = None
    last_sent = time.monotonic()
    version = -1
    while True:
        body = {**status_json(job_status(job, queue, with_logs=with_logs)), "request_id": job.id, **urls}
        if body != last:
            yield f"data: {json.dumps(body, default=str)}\n\n"
            last, last_sent = body, time.monotonic()
            if body["status"] == "COMPLETED":
                return
        elif time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if disconnected is not None and await disconnected():
            return
        # a queued job's position changes without its version moving: poll as well as wait
        version = await wait_change_async(job, version, poll_s)


async def with_keepalive(events: AsyncIterator[T], every_s: float = KEEPALIVE_S) -> AsyncIterator[T | None]:
    """`events`, with a None after each `every_s` of silence (the caller sends an SSE comment for it): a job that
    waits long in the queue must not look like a dead connection to the client's read timeout or a proxy. Closing
    this closes `events` (a streaming job's watcher cancels its job when abandoned)."""
    it = events.__aiter__()
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
