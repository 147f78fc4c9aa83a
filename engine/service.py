"""fal's Python API, in process: `FalService(engine)` wraps an `Engine` (composition: the engine knows nothing of
fal) with `run`, `submit` (-> `RequestHandle`), `subscribe`, `stream`, and their async twins.

Code written against `fal_client` runs against a local engine by swapping the module for a `FalService`: the same
call names, the same status objects (`Queued(position)`, `InProgress(logs)`, `Completed(logs, metrics, error,
error_type)`), the same result JSON. Everything goes through the engine's one job queue (`runtime.queue.queue_for`),
so several services and the HTTP server share the device fairly and report true queue positions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

from . import net
from .endpoints import EndpointTable, PreparedCall, prepare
from .errors import RequestNotFoundError, error_type_of
from .loading import CallerPolicy, as_caller, check_untrusted_model
from .runtime.files import FileStore
from .runtime.jobstore import JobStore, StoredJob
from .runtime.queue import Job, JobQueue, JobState, durable_queue, forget_queue, queue_for
from .runtime.webhooks import WebhookSender

if TYPE_CHECKING:
    from .api import Engine

log = logging.getLogger(__name__)


# -- statuses (field for field as fal_client's) -------------------------------------------------------------------
@dataclass
class Status:
    pass


@dataclass
class Queued(Status):
    position: int


@dataclass
class InProgress(Status):
    logs: list[dict[str, Any]] | None


@dataclass
class Completed(Status):
    logs: list[dict[str, Any]] | None
    metrics: dict[str, Any]
    error: str | None = None
    error_type: str | None = None


def job_status(job: Job, queue: JobQueue, with_logs: bool = False) -> Status:
    logs = [entry.to_dict() for entry in list(job.logs)] if with_logs else None
    if job.state is JobState.IN_QUEUE:
        position = queue.position(job)
        if position is not None:
            return Queued(position)
    if job.state is not JobState.COMPLETED:
        return InProgress(logs)
    metrics = {"inference_time": job.inference_time}
    if job.error is None:
        return Completed(logs, metrics)
    return Completed(logs, metrics, str(job.error), error_type_of(job.error))


def status_json(status: Status) -> dict[str, Any]:
    """The JSON fal's queue answers (`queue_position` and `logs` always present: the client indexes them)."""
    if isinstance(status, Queued):
        return {"status": "IN_QUEUE", "queue_position": status.position, "logs": None}
    if isinstance(status, InProgress):
        return {"status": "IN_PROGRESS", "logs": status.logs}
    assert isinstance(status, Completed)
    return {"status": "COMPLETED", "logs": status.logs, "metrics": status.metrics, "error": status.error,
            "error_type": status.error_type}


def job_result(job: Job) -> dict[str, Any]:
    """The finished job's fal JSON, or its error raised."""
    if not job.done:
        raise RuntimeError("job is not finished")
    if job.error is not None:
        raise job.error
    return job.result


def progress_event(job: Job, data: dict[str, Any]) -> dict[str, Any]:
    event = {"type": "progress", "request_id": job.id, "step": data["step"], "num_steps": data["num_steps"]}
    if "preview" in data:
        event["preview"] = data["preview"]
    return event


# -- handles -------------------------------------------------------------------------------------------------------
class RequestHandle:
    """A submitted request: poll it, follow it, wait for it, cancel it."""

    def __init__(self, service: "FalService", job: Job):
        self._service = service
        self._job = job
        self.request_id = job.id

    def status(self, with_logs: bool = False) -> Status:
        return job_status(self._job, self._service.queue, with_logs)

    def iter_events(self, with_logs: bool = False, interval: float = 1.0) -> Iterator[Status]:
        """Statuses as they change (queue position, state, each log line), ending with `Completed`."""
        version = -1
        while True:
            version = self._job.wait_change(version, timeout=interval)
            status = self.status(with_logs)
            yield status
            if isinstance(status, Completed):
                return

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        if not self._job.wait(timeout):
            raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
        return job_result(self._job)

    def cancel(self) -> str:
        """"cancelled" (was queued), "requested" (running: stops at its next step), or "completed" (too late)."""
        return self._service.queue.cancel(self.request_id)


class AsyncRequestHandle:
    """`RequestHandle` for asyncio: waiting never blocks the event loop (the worker wakes it)."""

    def __init__(self, service: "FalService", job: Job):
        self._service = service
        self._job = job
        self.request_id = job.id

    async def status(self, with_logs: bool = False) -> Status:
        return job_status(self._job, self._service.queue, with_logs)

    async def iter_events(self, with_logs: bool = False, interval: float = 1.0) -> AsyncIterator[Status]:
        version = -1
        while True:
            version = await wait_change_async(self._job, version, interval)
            status = job_status(self._job, self._service.queue, with_logs)
            yield status
            if isinstance(status, Completed):
                return

    async def get(self) -> dict[str, Any]:
        while not self._job.done:
            await wait_change_async(self._job, self._job.version, None)
        return job_result(self._job)

    async def cancel(self) -> str:
        return self._service.queue.cancel(self.request_id)


async def wait_change_async(job: Job, version: int, timeout: float | None) -> int:
    """Await `job.version != version` (or completion, or `timeout`) without holding a thread."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(changed.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    unwatch = job.watch(wake)
    try:
        if job.version == version and not job.done:
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
    finally:
        unwatch()
    return job.version


# -- the service ---------------------------------------------------------------------------------------------------
class FalService:
    """fal's API over one engine: `FalService(engine).run("fal-ai/fast-sdxl", {...})`.

    `trusted=False` (the default; the HTTP server always) treats callers as remote: model names are registry ids or
    hub ids (owner/name), never local paths, and a hub id must be in the local HF cache unless `allow_hub_downloads`;
    LoRAs are http(s) URLs or hub files; images are URLs or data URIs. `allow_models` (an allow-list) restricts
    untrusted callers to those names. Models the operator mapped to an endpoint are always served. `trusted=True`
    (your own code in process): local paths are fine.

    Jobs run on the engine's one queue (shared with every other service over the engine). `state_dir` makes it
    durable, as `engine serve --state-dir`: jobs are written to the job store there (and output files under it,
    unless `files` is given); a service started again on the same dir serves completed results until `retention_s`,
    runs queued jobs again and reports jobs that were running as `interrupted`. It must be given before the engine's
    queue exists (the first service over an engine decides). `close()` (or `with FalService(...)`) stops the queue."""

    def __init__(self, engine: "Engine", *, endpoint_overrides: Mapping[str, str] | None = None,
                 allow_private_urls: bool = False, trusted: bool = False, files: FileStore | None = None,
                 queue: JobQueue | None = None, timeout_s: float | None = None,
                 allow_models: Iterable[str] = (), allow_hub_downloads: bool = False,
                 state_dir: "str | os.PathLike[str] | JobStore | None" = None, retention_s: float | None = None):
        self.engine = engine
        self.table = EndpointTable(endpoint_overrides)
        self.allow_private_urls = allow_private_urls
        self.trusted = trusted
        self.allow_models = frozenset(allow_models)
        self.allow_hub_downloads = allow_hub_downloads
        recover = state_dir is not None and queue is None
        if recover:
            queue = _durable_queue_for(engine, state_dir, retention_s)
        self.queue = queue or queue_for(engine)
        store = self.queue.store
        durable_files = store.files_dir if store is not None and not store.temporary else None
        self.files = files or FileStore(durable_files, ttl_s=retention_s or 3600.0)
        self.timeout_s = timeout_s
        self.webhooks = WebhookSender(allow_private=allow_private_urls)  # the server swaps in a signing one
        if recover:
            self.queue.recover(self.resume)  # the last run's queued jobs go again, now that `resume` can run them

    @property
    def caller_policy(self) -> CallerPolicy:
        return CallerPolicy(trusted=self.trusted, allow_models=self.allow_models,
                            allow_hub_downloads=self.allow_hub_downloads, allow_private_urls=self.allow_private_urls)

    def _operator_models(self) -> set[str]:
        """Every model the endpoint table names (configs/endpoints.yaml and --endpoint): the operator's choices."""
        names: set[str] = set()
        for choice in self.table.as_dict().values():
            if isinstance(choice, str):
                names.add(choice)
            elif isinstance(choice, dict):
                names.update(v for v in choice.values() if isinstance(v, str))
        return names

    # -- building blocks (the server uses these) -----------------------------------------------------------------
    def prepare(self, app_id: str, arguments: Any) -> PreparedCall:
        """Validate (422 before queueing) and fetch inputs; may block on the network (image URLs)."""
        call = prepare(app_id, arguments, engine=self.engine, table=self.table, trusted=self.trusted,
                       allow_private_urls=self.allow_private_urls)
        policy = self.caller_policy
        if not policy.trusted:
            if call.model in self._operator_models():
                policy = policy.with_pinned(call.model)  # the operator mapped it: served as configured
            else:
                check_untrusted_model(call.model, policy)  # a 422 now, not a failed job later
        call.caller = policy  # type: ignore[attr-defined]
        call.arguments = arguments  # type: ignore[attr-defined]  # for a durable job store (see `resume`)
        return call

    def enqueue(self, call: PreparedCall, *, base_url: str | None = None, webhook_url: str | None = None,
                want_previews: bool = False, timeout_s: float | None = None,
                start_timeout_s: float | None = None, job_id: str | None = None) -> Job:
        if webhook_url is not None:
            self._check_webhook(webhook_url)
        engine, files = self.engine, self.files
        # The policy the call was prepared under; a call prepared elsewhere gets this service's.
        caller = getattr(call, "caller", None) or self.caller_policy

        def run(ctx: Any) -> dict[str, Any]:
            for note in call.notes:
                ctx.log(note)
            ctx.log(f"running {call.app_id} on {call.model}")
            with as_caller(caller):  # model and LoRA resolution on the worker see who asked
                result = call.execute(engine, ctx)
            return call.render(result, files, base_url)

        arguments = getattr(call, "arguments", None)  # kept by `prepare`: a durable queue can run it again
        record = None if arguments is None else {"arguments": arguments, "webhook_url": webhook_url,
                                                 "timeout_s": timeout_s}
        job = self.queue.submit(run, app_id=call.app_id, timeout_s=timeout_s or self.timeout_s,
                                start_timeout_s=start_timeout_s, want_previews=want_previews,
                                meta={"model": call.model, "base_url": base_url}, record=record, job_id=job_id)
        if webhook_url is not None:
            job.add_done_callback(lambda j: self.webhooks.send_job(webhook_url, j))
        return job

    def resume(self, stored: StoredJob) -> Job:
        """Queue a job read back from a durable store again, under its id (validated again, as any request; file
        URLs the server handed out under its base URL are read from the file store, as when it was submitted)."""
        record = stored.record or {}
        base_url = stored.meta.get("base_url")
        with net.local_urls(lambda url: self.files.read_local(url, [base_url] if base_url else [])):
            call = self.prepare(stored.app_id, record.get("arguments"))
        return self.enqueue(call, base_url=base_url, webhook_url=record.get("webhook_url"),
                            timeout_s=record.get("timeout_s"), job_id=stored.id)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the queue's threads (a running job ends `interrupted`; a durable store keeps queued ones for the next
        start) and the file store's purge; temporary outputs are removed. The queue is the engine's, shared: the
        next service over the engine starts a fresh one."""
        forget_queue(self.queue)
        self.queue.close(timeout)
        self.files.close()

    def __enter__(self) -> "FalService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def job(self, request_id: str) -> Job:
        job = self.queue.get(request_id)
        if job is None:
            raise RequestNotFoundError(f"no request {request_id!r} (unknown, or its result expired)")
        return job

    # -- fal's sync API ------------------------------------------------------------------------------------------
    def submit(self, app_id: str, arguments: dict[str, Any], webhook_url: str | None = None) -> RequestHandle:
        return RequestHandle(self, self.enqueue(self.prepare(app_id, arguments), webhook_url=webhook_url))

    def run(self, app_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.submit(app_id, arguments).get()

    def subscribe(self, app_id: str, arguments: dict[str, Any], with_logs: bool = False,
                  on_enqueue: Callable[[str], None] | None = None,
                  on_queue_update: Callable[[Status], None] | None = None) -> dict[str, Any]:
        handle = self.submit(app_id, arguments)
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        if on_queue_update is not None:
            for status in handle.iter_events(with_logs=with_logs):
                on_queue_update(status)
        return handle.get()

    def stream(self, app_id: str, arguments: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Progress events ({"type": "progress", step, num_steps, preview}) and then the result."""
        job = self.enqueue(self.prepare(app_id, arguments), want_previews=True)
        seq = 0
        try:
            while True:
                events = job.events_after(seq, timeout=1.0)
                for event in events:
                    seq = event.seq
                    if event.kind == "progress":
                        yield progress_event(job, event.data)
                if job.done and seq >= len(job.events):
                    yield job_result(job)
                    return
        finally:
            if not job.done:  # the consumer walked away: free the device
                self.queue.cancel(job.id)

    def get_handle(self, request_id: str) -> RequestHandle:
        return RequestHandle(self, self.job(request_id))

    def status(self, request_id: str, with_logs: bool = False) -> Status:
        return self.get_handle(request_id).status(with_logs)

    def result(self, request_id: str) -> dict[str, Any]:
        return self.get_handle(request_id).get()

    def cancel(self, request_id: str) -> str:
        self.job(request_id)
        return self.queue.cancel(request_id)

    # -- fal's async API -----------------------------------------------------------------------------------------
    async def submit_async(self, app_id: str, arguments: dict[str, Any],
                           webhook_url: str | None = None) -> AsyncRequestHandle:
        call = await asyncio.to_thread(self.prepare, app_id, arguments)
        return AsyncRequestHandle(self, self.enqueue(call, webhook_url=webhook_url))

    async def run_async(self, app_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return await (await self.submit_async(app_id, arguments)).get()

    async def subscribe_async(self, app_id: str, arguments: dict[str, Any], with_logs: bool = False,
                              on_enqueue: Callable[[str], None] | None = None,
                              on_queue_update: Callable[[Status], None] | None = None) -> dict[str, Any]:
        handle = await self.submit_async(app_id, arguments)
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        if on_queue_update is not None:
            async for status in handle.iter_events(with_logs=with_logs):
                on_queue_update(status)
        return await handle.get()

    async def stream_async(self, app_id: str, arguments: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        call = await asyncio.to_thread(self.prepare, app_id, arguments)
        job = self.enqueue(call, want_previews=True)
        async for event in self.follow_async(job):
            yield event

    async def follow_async(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        """A job's progress events, then its result (its error raised); cancels the job if abandoned."""
        seq = 0
        try:
            while True:
                version = job.version
                for event in job.events[seq:]:
                    seq = event.seq
                    if event.kind == "progress":
                        yield progress_event(job, event.data)
                if job.done and seq >= len(job.events):
                    yield job_result(job)
                    return
                await wait_change_async(job, version, 1.0)
        finally:
            if not job.done:
                self.queue.cancel(job.id)

    async def status_async(self, request_id: str, with_logs: bool = False) -> Status:
        return self.status(request_id, with_logs)

    async def result_async(self, request_id: str) -> dict[str, Any]:
        return await AsyncRequestHandle(self, self.job(request_id)).get()

    async def cancel_async(self, request_id: str) -> str:
        return self.cancel(request_id)

    # -- webhooks ------------------------------------------------------------------------------------------------
    def _check_webhook(self, url: str) -> None:
        self.webhooks.check(url)


def _durable_queue_for(engine: "Engine", state_dir: "str | os.PathLike[str] | JobStore",
                       retention_s: float | None) -> JobQueue:
    queue = queue_for(engine, lambda: durable_queue(str(getattr(engine, "device", "device")), state_dir,
                                                    retention_s=retention_s))
    store = queue.store
    wanted = state_dir.root if isinstance(state_dir, JobStore) else state_dir
    if store is None or store.temporary or os.path.realpath(store.root) != os.path.realpath(wanted):
        raise ValueError(f"state_dir={str(wanted)!r}: this engine's job queue already runs "
                         f"{'in memory' if store is None or store.temporary else f'on {store.root}'}; "
                         "give state_dir to the first service over an engine (or close that one first)")
    return queue

