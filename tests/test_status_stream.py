"""Status streaming: the events `status_events` makes for a job on a real JobQueue (queued behind another, running
with logs, completed), ending at COMPLETED. The route against `engine serve`, read with httpx-sse, is in
test_server_extras.py."""

import asyncio
import json
import threading

import pytest

from engine.runtime.queue import JobQueue
from engine.server.status_stream import status_events

URLS = {"response_url": "https://h/queue/a/requests/x", "status_url": "https://h/queue/a/requests/x/status",
        "cancel_url": "https://h/queue/a/requests/x/cancel"}


def parse(lines):
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


async def collect(job, queue, with_logs):
    return [line async for line in status_events(job, queue, with_logs=with_logs, urls=URLS, poll_s=0.05)]


def test_events_follow_queue_progress_and_end_at_completed():
    queue = JobQueue(name="t")
    gate = threading.Event()

    def blocker(ctx):
        gate.wait(10)
        return {"ok": 0}

    def work(ctx):
        for i in range(3):
            ctx.progress(i + 1, 3)
        return {"ok": 1}

    try:
        first = queue.submit(blocker, app_id="a")
        job = queue.submit(work, app_id="a")
        threading.Timer(0.3, gate.set).start()
        events = parse(asyncio.run(collect(job, queue, with_logs=True)))
    finally:
        gate.set()
        queue.close(5)
    assert first.done
    assert events[0]["status"] == "IN_QUEUE" and events[0]["queue_position"] == 0
    assert events[-1]["status"] == "COMPLETED" and events[-1]["error"] is None
    assert events[-1]["metrics"]["inference_time"] is not None
    assert [e["message"] for e in events[-1]["logs"]][-3:] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(e["request_id"] == job.id and e["status_url"] == URLS["status_url"] for e in events)
    assert {e["status"] for e in events} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert sum(e["status"] == "COMPLETED" for e in events) == 1
    for a, b in zip(events, events[1:]):
        assert a != b  # only changes are sent


def test_without_logs_and_for_a_failed_job():
    queue = JobQueue(name="t2")

    def fails(ctx):
        ctx.log("about to fail")
        raise ValueError("boom")

    try:
        job = queue.submit(fails, app_id="a")
        events = parse(asyncio.run(collect(job, queue, with_logs=False)))
    finally:
        queue.close(5)
    assert events[-1]["status"] == "COMPLETED" and events[-1]["logs"] is None
    assert events[-1]["error"] and events[-1]["error_type"] == "internal_error"
    assert all(e["logs"] is None for e in events)


def test_a_finished_job_streams_one_event():
    queue = JobQueue(name="t3")
    try:
        job = queue.submit(lambda ctx: {"ok": 1}, app_id="a")
        job.wait(5)
        lines = asyncio.run(collect(job, queue, with_logs=True))
    finally:
        queue.close(5)
    assert len(lines) == 1 and parse(lines)[0]["status"] == "COMPLETED"
    assert lines[0].endswith("\n\n")


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), (None, False)])
def test_truthy(value, expected):
    from engine.server.status_stream import truthy

    assert truthy(value) is expected
