"""The job queue: one worker thread per device runs jobs in submission order, one at a time (a GPU does one diffusion
job well, two badly), while any number of threads submit, poll, stream and cancel.

A job moves IN_QUEUE -> IN_PROGRESS -> COMPLETED (fal's statuses). Whatever happens inside, it ends COMPLETED, with
either a result or an error, so a bad request never takes the worker down. Cancel and timeouts are cooperative: a
queued job is dropped before it starts; a running one stops at its next denoising step (the job function calls
`JobContext.check()` from its step callback). No exception in a job, `BaseException`s included, stops the worker.

Finished jobs are kept for `retention_s`, and at most `max_jobs` of them holding at most `max_bytes` (result JSON plus
the output files they wrote); the oldest go first, with their files, on a periodic purge and on close. With a
`JobStore` (SQLite under the state dir) every job is also written down: after a restart completed results are served
until retention, queued jobs run again (`recover`) and jobs that were running end failed as `interrupted`.

Every change (state, log line, progress step) is appended to the job's event list and wakes its watchers, which is
what status polling, `iter_events` and SSE streaming read from; nothing polls the worker. Only the latest progress
events keep their preview image.
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable

from ..errors import (EngineError, JobCancelledError, JobInterruptedError, JobTimeoutError,  # noqa: F401 - re-exported
                      RestoredJobError)
from .jobstore import JobStore, StoredJob

log = logging.getLogger(__name__)

Watcher = Callable[[], None]


class JobState(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


def error_record(error: BaseException) -> dict[str, Any]:
    """A JSON description of a job's error (what `RestoredJobError` rebuilds)."""
    if isinstance(error, EngineError):
        try:
            body = json.loads(json.dumps(error.to_dict(), default=str))
        except Exception:  # noqa: BLE001 - a body that will not serialise: the default one is rebuilt
            body = None
        return {"message": str(error), "type": type(error).__name__, "error_type": error.error_type,
                "http_status": error.http_status, "body": body}
    return {"message": str(error), "type": type(error).__name__, "error_type": "internal_error", "http_status": 500,
            "body": {"detail": f"{type(error).__name__}: {error}", "error_type": "internal_error"}}


_CURRENT_JOB: contextvars.ContextVar["Job | None"] = contextvars.ContextVar("engine_current_job", default=None)


def current_job() -> "Job | None":
    """The job the calling worker thread runs (None outside a job): for code that waits on a job's behalf."""
    return _CURRENT_JOB.get()


def check_current_job() -> None:
    """Raise if the calling thread's job was cancelled or ran out of time (nothing outside a job): for work that
    starts after a wait (the engine's run lock), so a job cancelled while waiting does no work at all."""
    job = _CURRENT_JOB.get()
    if job is not None:
        JobContext(job).check()


def note_file(key: str, path: str, size: int) -> None:
    """Record that the running job wrote this output file (removed with the job's result)."""
    job = _CURRENT_JOB.get()
    if job is not None:
        job.files.append({"key": key, "path": path, "size": size})


MAX_LOGS = 2000  # per job: the oldest lines go first
KEEP_PREVIEWS = 2  # progress events that keep their preview image while a job runs


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
                 want_previews: bool, meta: dict[str, Any], job_id: str | None = None,
                 record: dict[str, Any] | None = None):
        self.id = job_id or str(uuid.uuid4())
        self.record = record  # how to run it again after a restart (None: it cannot be)
        self.files: list[dict[str, Any]] = []  # output files it wrote: {key, path, size}
        self.nbytes = 0  # result JSON + files, once done
        self.persist = True  # False: its end is not written to the store (shut down while queued: resumes later)
        self.interrupting = False  # set on close: a cancel that follows is an interruption
        self.finishing_hook: Callable[[Job], None] | None = None  # the queue's: store and account the result
        self._finishing = False
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
        self._previews: collections.deque[int] = collections.deque()  # indices of events holding a preview

    @classmethod
    def restored(cls, stored: StoredJob) -> "Job":
        """A finished job read back from the store."""
        job = cls(None, app_id=stored.app_id, deadline=None, start_deadline=None,  # type: ignore[arg-type]
                  want_previews=False, meta=dict(stored.meta), job_id=stored.id)
        job.state = JobState.COMPLETED
        job.created_at = 0.0
        if stored.inference_time is not None:
            job.started_at, job.finished_at = 0.0, stored.inference_time
        job.result = stored.result
        job.error = RestoredJobError(stored.error) if stored.error else None
        job.logs = [LogEntry(str(e.get("message", "")), str(e.get("level", "INFO")), str(e.get("source", "engine")),
                             float(e.get("timestamp", 0.0))) for e in stored.logs]
        job.files = list(stored.files)
        job.nbytes = stored.bytes
        job.events = [JobEvent(1, "state", {"state": JobState.COMPLETED.value})]
        job.version = 1
        return job

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
                if data and "preview" in data:
                    self._previews.append(len(self.events) - 1)
                    while len(self._previews) > KEEP_PREVIEWS:
                        self._drop_preview(self._previews.popleft())
            self.version += 1
            watchers = list(self._watchers)
            self._cond.notify_all()
        for w in watchers:
            _safe(w)

    def _drop_preview(self, index: int) -> None:
        event = self.events[index]
        self.events[index] = JobEvent(event.seq, event.kind, {k: v for k, v in event.data.items() if k != "preview"})

    def _log(self, message: str, level: str = "INFO") -> None:
        entry = LogEntry(message, level)
        with self._cond:
            self.logs.append(entry)
            if len(self.logs) > MAX_LOGS:
                del self.logs[: len(self.logs) - MAX_LOGS]
        self._emit("log", {"entry": entry})

    def _set_state(self, state: JobState) -> None:
        with self._cond:
            self.state = state
            if state is JobState.IN_PROGRESS:
                self.started_at = time.monotonic()
        self._emit("state", {"state": state.value})

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done or self._finishing:
                return
            self._finishing = True
            self.result, self.error = result, error
            self.finished_at = time.monotonic()
            if self.started_at is None:
                self.started_at = self.finished_at
        if self.finishing_hook is not None:  # written down before anyone sees it completed
            _safe(self.finishing_hook, self)
        with self._cond:
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
    """FIFO of jobs for one device, drained by `workers` threads (1 per device).

    `store`: write every job to this `JobStore` (durable when it has a state dir); `close()` closes it. Retention:
    finished jobs older than `retention_s`, beyond the newest `max_jobs`, or beyond `max_bytes` in all (result JSON
    plus output files) are forgotten, their files deleted, every `purge_interval_s` and on close. With a store only
    the newest `hot_jobs` finished jobs stay in memory; older ones are read back from the store when asked for."""

    def __init__(self, *, name: str = "device", workers: int = 1, retention_s: float = 3600.0,
                 default_timeout_s: float | None = None, store: JobStore | None = None,
                 max_jobs: int | None = 1000, max_bytes: int | None = 1 << 30,
                 purge_interval_s: float | None = None, hot_jobs: int = 64):
        self.name = name
        self.retention_s = retention_s
        self.default_timeout_s = default_timeout_s
        self.store = store
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.hot_jobs = hot_jobs
        self._purge_interval_s = purge_interval_s
        self._lock = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._running: dict[str, Job] = {}
        # every retained finished job, oldest first: id -> (finished wall time, bytes, files)
        self._done: collections.OrderedDict[str, tuple[float, int, list[dict[str, Any]]]] = collections.OrderedDict()
        self._done_bytes = 0
        self._hot: collections.OrderedDict[str, None] = collections.OrderedDict()  # finished jobs in memory
        self._stopping = False
        self._closed = False
        self._stop = threading.Event()
        if store is not None:
            self._load_store(store)
        self._threads = [self._spawn(i) for i in range(workers)]
        self._janitor = threading.Thread(target=self._janitor_loop, name=f"engine-{name}-janitor", daemon=True)
        self._janitor.start()

    @property
    def threads(self) -> list[threading.Thread]:
        """The queue's threads (workers and janitor)."""
        return [*self._threads, self._janitor]

    # -- API ----------------------------------------------------------------------------------------------------
    def submit(self, fn: JobFn, *, app_id: str = "", timeout_s: float | None = None,
               start_timeout_s: float | None = None, want_previews: bool = False,
               meta: dict[str, Any] | None = None, on_done: Callable[[Job], None] | None = None,
               record: dict[str, Any] | None = None, job_id: str | None = None) -> Job:
        """Enqueue `fn(ctx)`; `timeout_s` bounds queueing plus running, `start_timeout_s` the wait to start.
        `record`: JSON that lets the owner of a durable store run the job again after a restart (see `recover`);
        `job_id`: keep this id (a resumed job)."""
        now = time.monotonic()
        timeout_s = timeout_s if timeout_s is not None else self.default_timeout_s
        meta = dict(meta or {})
        if record is not None and not _json_ok(record):
            record = None
        job = Job(fn, app_id=app_id, deadline=now + timeout_s if timeout_s else None,
                  start_deadline=now + start_timeout_s if start_timeout_s else None,
                  want_previews=want_previews, meta=meta, job_id=job_id, record=record)
        job.finishing_hook = self._finished
        if on_done is not None:
            job.add_done_callback(on_done)
        _quietly(self.purge)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the job queue is shut down")
            if self.store is not None:
                self.store.add(job.id, app_id, record=record, meta=meta if _json_ok(meta) else {})
            self._jobs[job.id] = job
            self._pending.append(job)
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        """The job, from memory or (finished, with a store) read back from the store; None when unknown or expired."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None or self.store is None or job_id not in self._done:
                return job
        stored = self.store.get(job_id)
        if stored is None or stored.state != "COMPLETED":
            return None
        return Job.restored(stored)

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
                return "completed" if job_id in self._done else "not_found"
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

    def stats(self) -> dict[str, int]:
        """Retained finished jobs and their bytes (results plus files)."""
        with self._lock:
            return {"finished": len(self._done), "bytes": self._done_bytes, "in_memory": len(self._jobs)}

    def shutdown(self, *, cancel_pending: bool = True, timeout: float | None = 10.0,
                 interrupt_running: bool = False) -> None:
        """Stop taking jobs and stop the threads (waiting up to `timeout` for each). Queued jobs end cancelled, except
        resumable ones of a durable store: they stay queued there and run after a restart. `interrupt_running`: the
        running job is stopped at its next step and ends `interrupted`."""
        durable = self.store is not None and not self.store.temporary
        with self._lock:
            self._stopping = True
            pending = list(self._pending) if cancel_pending else []
            if cancel_pending:
                self._pending.clear()
            running = list(self._running.values()) if interrupt_running else []
            self._lock.notify_all()
        self._stop.set()
        for job in running:
            job.interrupting = True
            job.cancel_requested.set()
        for job in pending:
            if durable and job.record is not None:
                job.persist = False
                job._finish(error=JobInterruptedError("the server shut down before this request started; it runs "
                                                      "again when the server restarts"))
            else:
                job._finish(error=JobCancelledError("server shutting down"))
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Shut down (interrupting the running job), purge what retention drops, close the store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.shutdown(cancel_pending=True, timeout=timeout, interrupt_running=True)
        self.purge()
        if self.store is not None:
            if self.store.temporary:  # nothing outlives a temporary store: drop every file now
                with self._lock:
                    gone = [files for _, _, files in self._done.values()]
                for files in gone:
                    _remove_files(files)
            self.store.close()

    def __enter__(self) -> "JobQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def recover(self, resume: Callable[[StoredJob], Any] | None) -> dict[str, int]:
        """Run the store's queued jobs again, in their order: `resume(stored)` must submit it again with
        `job_id=stored.id` (a failure ends the job with that error). Without `resume`, or for a job that left no
        record, they end `interrupted`. Returns counts."""
        counts = {"resumed": 0, "failed": 0}
        if self.store is None:
            return counts
        for stored in self.store.in_state("IN_QUEUE"):
            with self._lock:
                if stored.id in self._jobs:
                    continue
            error: BaseException | None = None
            if resume is None or stored.record is None:
                error = JobInterruptedError("the server restarted before this request ran, and it cannot be resumed")
            else:
                try:
                    resume(stored)
                    counts["resumed"] += 1
                    continue
                except Exception as e:  # noqa: BLE001 - a request that no longer validates ends with its error
                    error = e
            self._fail_stored(stored, error)
            counts["failed"] += 1
        return counts

    def purge(self) -> int:
        """Forget finished jobs past retention (age, count, bytes), oldest first, deleting their files; returns how
        many."""
        now = time.time()
        cutoff = now - self.retention_s
        dropped: list[tuple[str, list[dict[str, Any]]]] = []
        with self._lock:
            while self._done:
                job_id, (finished, nbytes, files) = next(iter(self._done.items()))
                over_count = self.max_jobs is not None and len(self._done) > self.max_jobs
                over_bytes = self.max_bytes is not None and self._done_bytes > self.max_bytes
                if finished >= cutoff and not over_count and not over_bytes:
                    break
                del self._done[job_id]
                self._done_bytes -= nbytes
                self._hot.pop(job_id, None)
                self._jobs.pop(job_id, None)  # finished (or finishing): a handle that holds it still works
                dropped.append((job_id, files))
        for _, files in dropped:
            _remove_files(files)
        if dropped and self.store is not None:
            _quietly(self.store.delete, [job_id for job_id, _ in dropped])
        return len(dropped)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def _load_store(self, store: JobStore) -> None:
        for stored in store.in_state("IN_PROGRESS"):
            self._fail_stored(stored, JobInterruptedError("the server stopped while this request was running; "
                                                          "submit it again"), remember=False)
        for job_id, finished, nbytes, files in store.completed_index():
            self._done[job_id] = (finished, nbytes, files)
            self._done_bytes += nbytes

    def _fail_stored(self, stored: StoredJob, error: BaseException, remember: bool = True) -> None:
        """End a job known only from the store with `error`."""
        assert self.store is not None
        record = error_record(error)
        logs = [*stored.logs, {"message": f"{type(error).__name__}: {error}", "level": "ERROR", "source": "engine",
                               "timestamp": time.time()}]
        nbytes = len(json.dumps(record)) + sum(int(f.get("size", 0)) for f in stored.files)
        self.store.finished(stored.id, result=None, error=record, logs=logs, files=stored.files, inference_time=None,
                            result_json=None, nbytes=nbytes)
        with self._lock:
            self._done[stored.id] = (time.time(), nbytes, list(stored.files))
            self._done_bytes += nbytes

    def _finished(self, job: Job) -> None:
        """Called as a job finishes, before it shows as completed: account its bytes, write it down, trim memory."""
        result_json: str | None = None
        if job.error is None:
            try:
                result_json = json.dumps(job.result, separators=(",", ":"))
            except (TypeError, ValueError):
                result_json = None
        error = error_record(job.error) if job.error is not None else None
        job.nbytes = (len(result_json) if result_json else len(json.dumps(error)) if error else 0) + sum(
            int(f.get("size", 0)) for f in job.files)
        persisted = False
        # an in-process result that is not JSON stays in memory only
        if self.store is not None and job.persist and (error is not None or result_json is not None):
            persisted = _quietly(self.store.finished, job.id, result=None, error=error,
                                 logs=[asdict_log(e) for e in list(job.logs)], files=list(job.files),
                                 inference_time=job.inference_time, result_json=result_json, nbytes=job.nbytes)
        with self._lock:
            if not job.persist:  # shut down while queued: it stays queued in the store and is not retained here
                self._jobs.pop(job.id, None)
                return
            self._done[job.id] = (time.time(), job.nbytes, list(job.files))
            self._done_bytes += job.nbytes
            if persisted:
                self._hot[job.id] = None
                while len(self._hot) > self.hot_jobs:
                    old, _ = self._hot.popitem(last=False)
                    old_job = self._jobs.get(old)
                    if old_job is not None and old_job.done:
                        del self._jobs[old]
        if self.max_jobs is not None or self.max_bytes is not None:
            self.purge()

    # -- threads ------------------------------------------------------------------------------------------------
    def _spawn(self, index: int) -> threading.Thread:
        t = threading.Thread(target=self._work, name=f"engine-{self.name}-{index}", daemon=True)
        t.start()
        return t

    def _janitor_loop(self) -> None:
        interval = self._purge_interval_s or max(0.05, min(60.0, self.retention_s / 2))
        while not self._stop.wait(interval):
            _quietly(self.purge)

    def _next(self) -> Job | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._lock.wait()
            if not self._pending:
                return None
            job = self._pending.popleft()
            self._running[job.id] = job
        self._positions_changed()
        return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            except (KeyboardInterrupt, SystemExit):  # the job is failed already; a fresh worker takes over
                self._replace(threading.current_thread())
                raise
            except Exception:  # noqa: BLE001 - bookkeeping failed (the store?): log it, the worker lives on
                log.exception("job queue %s: error around job %s", self.name, job.id)
                if not job.done:
                    job._finish(error=JobInterruptedError("internal error in the job queue"))
            finally:
                with self._lock:
                    self._running.pop(job.id, None)

    def _replace(self, dead: threading.Thread) -> None:
        with self._lock:
            if self._stopping or dead not in self._threads:
                return
            index = self._threads.index(dead)
            self._threads[index] = self._spawn(index)

    def _run(self, job: Job) -> None:
        now = time.monotonic()
        if job.start_deadline is not None and now > job.start_deadline:
            job._finish(error=JobTimeoutError("request timed out before it started"))
            return
        ctx = JobContext(job)
        job._set_state(JobState.IN_PROGRESS)
        if self.store is not None:
            _quietly(self.store.started, job.id)
        token = _CURRENT_JOB.set(job)
        try:
            ctx.check()
            result = job.fn(ctx)
        except BaseException as e:  # noqa: BLE001 - every failure becomes the job's error, the worker lives on
            if job.interrupting and isinstance(e, JobCancelledError):
                e = JobInterruptedError("the server shut down while this request was running; submit it again")
            if not isinstance(e, EngineError):
                log.error("job %s (%s) failed", job.id, job.app_id, exc_info=(type(e), e, e.__traceback__))
            job._log(f"{type(e).__name__}: {e}", "ERROR")
            job._finish(error=e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return
        finally:
            _CURRENT_JOB.reset(token)
        job._finish(result=result)

    def _positions_changed(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        for job in waiting:
            job._emit(None)


def asdict_log(entry: LogEntry) -> dict[str, Any]:
    return {"message": entry.message, "level": entry.level, "source": entry.source, "timestamp": entry.timestamp}


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _remove_files(files: list[dict[str, Any]]) -> None:
    for f in files:
        path = f.get("path")
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not remove %s: %s", path, e)


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run a bookkeeping step; a failure (disk full, store closed) is logged, never raised into the worker."""
    try:
        fn(*args, **kwargs)
        return True
    except Exception:  # noqa: BLE001
        log.exception("job queue bookkeeping failed: %s", getattr(fn, "__name__", fn))
        return False


def durable_queue(name: str, state_dir: "str | os.PathLike[str] | JobStore | None", *,
                  retention_s: float | None = None, max_jobs: int | None = None, max_bytes: int | None = None,
                  default_timeout_s: float | None = None) -> JobQueue:
    """A queue over the job store in `state_dir` (an open `JobStore`, a folder, or None: a temporary one).
    Call `recover(resume)` on it once whoever resumes jobs is ready."""
    store = state_dir if isinstance(state_dir, JobStore) else JobStore(state_dir)
    kwargs: dict[str, Any] = {}
    if max_jobs is not None:
        kwargs["max_jobs"] = max_jobs
    if max_bytes is not None:
        kwargs["max_bytes"] = max_bytes
    return JobQueue(name=name, store=store, retention_s=retention_s or 3600.0, default_timeout_s=default_timeout_s,
                    **kwargs)


# -- one queue per engine ------------------------------------------------------------------------------------------
# Keyed by the engine object (weakly): every fal-style service over one engine, and the server, share its one worker,
# so they take turns on the device and report true queue positions. The engine stops it in `Engine.close()`.
_QUEUES: "weakref.WeakKeyDictionary[Any, JobQueue]" = weakref.WeakKeyDictionary()
_QUEUES_LOCK = threading.Lock()


def queue_for(owner: Any, factory: Callable[[], JobQueue] | None = None) -> JobQueue:
    """`owner`'s job queue (an engine's: it drives one device, so one worker), created on first use by `factory`
    (default: an in-memory queue named after `owner.device`)."""
    with _QUEUES_LOCK:
        queue = _QUEUES.get(owner)
        if queue is None:
            queue = factory() if factory is not None else JobQueue(name=str(getattr(owner, "device", "device")))
            _QUEUES[owner] = queue
        return queue


def existing_queue(owner: Any) -> JobQueue | None:
    """`owner`'s job queue if one was created (and not closed since), else None."""
    with _QUEUES_LOCK:
        return _QUEUES.get(owner)


def forget_queue(queue: JobQueue) -> None:
    """Drop `queue` from the registry (it is being closed): the owner's next `queue_for` makes a fresh one."""
    with _QUEUES_LOCK:
        for owner, known in list(_QUEUES.items()):
            if known is queue:
                del _QUEUES[owner]


def close_queue(owner: Any, timeout: float | None = 10.0) -> None:
    """Stop `owner`'s job queue (its threads; a running job ends `interrupted`) and forget it."""
    with _QUEUES_LOCK:
        queue = _QUEUES.pop(owner, None)
    if queue is not None:
        queue.close(timeout)
