"""The job queue: one worker thread per device runs jobs in submission order, one at a time (a GPU does one diffusion
job well, two badly), while any number of threads submit, poll, stream and cancel.

A job moves IN_QUEUE -> IN_PROGRESS -> COMPLETED (fal's statuses). Whatever happens inside, it ends COMPLETED, with
either a result or an error, so a bad request never takes the worker down. Cancel and timeouts are cooperative: a
queued job is dropped before it starts; a running one stops at its next denoising step (the job function calls
`JobContext.check()` from its step callback). Finished jobs are kept for `retention_s`, then forgotten.

Every change (state, log line, progress step) is appended to the job's event list and wakes its watchers, which is
what status polling, `iter_events` and SSE streaming read from; nothing polls the worker.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable

from ..errors import EngineError, JobCancelledError

log = logging.getLogger(__name__)

Watcher = Callable[[], None]


class JobState(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class JobTimeoutError(EngineError):
    """The job ran (or waited) past its deadline."""

    error_type = "request_timeout"
    http_status = 504


@dataclass(frozen=True)
class LogEntry:
    message: str
    level: str = "INFO"
    source: str = "engine"
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, str]:
        ts = datetime.fromtimestamp(self.timestamp, tz=timezone.utc).isoformat()
        return {"message": self.message, "level": self.level, "source": self.source, "timestamp": ts}


@dataclass(frozen=True)
class JobEvent:
    """One change: kind "state" (data: state), "log" (data: entry), "progress" (data: step, num_steps, preview)."""

    seq: int
    kind: str
    data: dict[str, Any]


JobFn = Callable[["JobContext"], Any]


class Job:
    """One request: its state, logs, events, and eventually a result or an error."""

    def __init__(self, fn: JobFn, *, app_id: str, deadline: float | None, start_deadline: float | None,
                 want_previews: bool, meta: dict[str, Any]):
        self.id = str(uuid.uuid4())
        self.app_id = app_id
        self.fn = fn
        self.meta = meta
        self.want_previews = want_previews
        self.deadline = deadline
        self.start_deadline = start_deadline
        self.state = JobState.IN_QUEUE
        self.created_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.logs: list[LogEntry] = []
        self.events: list[JobEvent] = []
        self.cancel_requested = threading.Event()
        self._cond = threading.Condition()
        self.version = 0  # bumped on every change, queue position included
        self._watchers: list[Watcher] = []
        self._done_callbacks: list[Callable[[Job], None]] = []

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state is JobState.COMPLETED

    @property
    def inference_time(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job completes (True) or `timeout` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def wait_change(self, version: int, timeout: float | None = None) -> int:
        """Block until `self.version` differs from `version` (or the job is done, or `timeout`); returns it."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != version or self.done, timeout)
            return self.version

    def events_after(self, seq: int, timeout: float | None = None) -> list[JobEvent]:
        """Events with seq > `seq`, waiting up to `timeout` for at least one (empty when none came or job is done)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > seq or self.done, timeout)
            return self.events[seq:]

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher()` (from the changing thread) after every change; returns the function that stops it."""
        with self._cond:
            self._watchers.append(watcher)

        def unwatch() -> None:
            with self._cond:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

        return unwatch

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        """Run `callback(job)` once the job completes (at once if it already has)."""
        with self._cond:
            if not self.done:
                self._done_callbacks.append(callback)
                return
        callback(self)

    # -- writing (queue and worker) -----------------------------------------------------------------------------
    def _emit(self, kind: str | None, data: dict[str, Any] | None = None) -> None:
        """Record an event (kind None: only the queue position changed) and wake everyone watching."""
        with self._cond:
            if kind is not None:
                self.events.append(JobEvent(len(self.events) + 1, kind, data or {}))
            self.version += 1
            watchers = list(self._watchers)
            self._cond.notify_all()
        for w in watchers:
            _safe(w)

    def _log(self, message: str, level: str = "INFO") -> None:
        entry = LogEntry(message, level)
        with self._cond:
            self.logs.append(entry)
        self._emit("log", {"entry": entry})

    def _set_state(self, state: JobState) -> None:
        with self._cond:
            self.state = state
            if state is JobState.IN_PROGRESS:
                self.started_at = time.monotonic()
        self._emit("state", {"state": state.value})

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.result, self.error = result, error
            self.finished_at = time.monotonic()
            if self.started_at is None:
                self.started_at = self.finished_at
            self.state = JobState.COMPLETED
            callbacks, self._done_callbacks = self._done_callbacks, []
            self.fn = None  # type: ignore[assignment]  # drop the closure (and its inputs) early
        self._emit("state", {"state": JobState.COMPLETED.value})
        for cb in callbacks:
            _safe(cb, self)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a broken watcher must not break the worker
        log.exception("job watcher failed")


class JobContext:
    """What a job function gets: logging, progress, and the cooperative stop check."""

    def __init__(self, job: Job):
        self.job = job

    def log(self, message: str, level: str = "INFO") -> None:
        self.job._log(message, level)

    def check(self) -> None:
        """Raise if the job was cancelled or ran out of time; call between units of work."""
        if self.job.cancel_requested.is_set():
            raise JobCancelledError("request cancelled")
        if self.job.deadline is not None and time.monotonic() > self.job.deadline:
            raise JobTimeoutError("request timed out while running")

    def progress(self, step: int, num_steps: int, preview: Callable[[], Any] | None = None) -> None:
        """Record step `step` (1-based) of `num_steps`; `preview()` is only evaluated when someone streams."""
        data: dict[str, Any] = {"step": step, "num_steps": num_steps}
        if preview is not None and self.job.want_previews:
            data["preview"] = preview()
        self.job._log(f"step {step}/{num_steps}")
        self.job._emit("progress", data)
        self.check()


class JobQueue:
    """FIFO of jobs for one device, drained by `workers` threads (1 per device)."""

    def __init__(self, *, name: str = "device", workers: int = 1, retention_s: float = 3600.0,
                 default_timeout_s: float | None = None):
        self.name = name
        self.retention_s = retention_s
        self.default_timeout_s = default_timeout_s
        self._lock = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._running: set[str] = set()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"engine-{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- API ----------------------------------------------------------------------------------------------------
    def submit(self, fn: JobFn, *, app_id: str = "", timeout_s: float | None = None,
               start_timeout_s: float | None = None, want_previews: bool = False,
               meta: dict[str, Any] | None = None, on_done: Callable[[Job], None] | None = None) -> Job:
        """Enqueue `fn(ctx)`; `timeout_s` bounds queueing plus running, `start_timeout_s` the wait to start."""
        now = time.monotonic()
        timeout_s = timeout_s if timeout_s is not None else self.default_timeout_s
        job = Job(fn, app_id=app_id, deadline=now + timeout_s if timeout_s else None,
                  start_deadline=now + start_timeout_s if start_timeout_s else None,
                  want_previews=want_previews, meta=dict(meta or {}))
        if on_done is not None:
            job.add_done_callback(on_done)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the job queue is shut down")
            self._purge_locked(now)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """0-based place among jobs waiting to start; None once it has started."""
        with self._lock:
            if job.state is not JobState.IN_QUEUE:
                return None
            try:
                return self._pending.index(job)
            except ValueError:
                return 0  # taken by a worker, state about to change

    def cancel(self, job_id: str) -> str:
        """ "cancelled" (was queued: dropped now), "requested" (running: stops at its next step), "completed" or
        "not_found"."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return "not_found"
            if job.done:
                return "completed"
            job.cancel_requested.set()
            queued = job in self._pending
            if queued:
                self._pending.remove(job)
        if queued:
            job._log("cancelled while queued", "WARNING")
            job._finish(error=JobCancelledError("request cancelled before it started"))
            self._positions_changed()
            return "cancelled"
        job._log("cancellation requested; stopping at the next step", "WARNING")
        return "requested"

    def depth(self) -> tuple[int, int]:
        """(queued, running)."""
        with self._lock:
            return len(self._pending), len(self._running)

    def shutdown(self, *, cancel_pending: bool = True, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stopping = True
            pending = list(self._pending) if cancel_pending else []
            if cancel_pending:
                self._pending.clear()
            self._lock.notify_all()
        for job in pending:
            job._finish(error=JobCancelledError("server shutting down"))
        for t in self._threads:
            t.join(timeout)

    # -- worker -------------------------------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._lock.wait(timeout=min(60.0, self.retention_s))
                self._purge_locked(time.monotonic())
            if not self._pending:
                return None
            job = self._pending.popleft()
            self._running.add(job.id)
        self._positions_changed()
        return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running.discard(job.id)

    def _run(self, job: Job) -> None:
        now = time.monotonic()
        if job.start_deadline is not None and now > job.start_deadline:
            job._finish(error=JobTimeoutError("request timed out before it started"))
            return
        ctx = JobContext(job)
        job._set_state(JobState.IN_PROGRESS)
        try:
            ctx.check()
            result = job.fn(ctx)
        except BaseException as e:  # noqa: BLE001 - every failure becomes the job's error, the worker lives on
            if not isinstance(e, EngineError):
                log.exception("job %s (%s) failed", job.id, job.app_id)
            job._log(f"{type(e).__name__}: {e}", "ERROR")
            job._finish(error=e)
            if not isinstance(e, Exception):
                raise
            return
        job._finish(result=result)

    def _positions_changed(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        for job in waiting:
            job._emit(None)

    def _purge_locked(self, now: float) -> None:
        cutoff = now - self.retention_s
        stale = [k for k, j in self._jobs.items() if j.done and (j.finished_at or now) < cutoff]
        for k in stale:
            del self._jobs[k]
