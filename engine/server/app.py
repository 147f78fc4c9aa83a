"""The ASGI app: fal's run, stream and queue protocols over one engine, plus files, health, metrics and Key auth.

Point the official client here with `FAL_RUN_HOST=H:P` and `FAL_QUEUE_RUN_HOST=H:P/queue`. Routes:
  POST /{app_id}                                  run, answers the result
  POST /{app_id}/stream                           server-sent events: progress..., then the result
  POST /queue/{app_id}[?fal_webhook=URL]          submit
  GET  /queue/{any}/requests/{id}/status?logs=    status      (looked up by id: the client drops sub-paths)
  GET  /queue/{any}/requests/{id}                 result
  PUT  /queue/{any}/requests/{id}/cancel          cancel
  GET  /files/{key}  GET /health  GET /metrics
Validation, input fetching and encoding run in worker threads; the event loop only routes and waits.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any, Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..endpoints import ENDPOINTS, AppNotFoundError
from ..errors import EngineError, InvalidRequestError
from ..runtime.files import FileStore
from ..runtime.jobstore import JobStore
from ..runtime.queue import durable_queue
from ..runtime.queue import Job, JobTimeoutError
from ..service import FalService, RequestNotFoundError, error_type_of, job_result, job_status, queue_for, status_json
from ..service import wait_change_async
from .metrics import Metrics

TIMEOUT_HEADER = "x-fal-request-timeout"
MAX_BODY_BYTES = 96 * 1024 * 1024  # room for a 64 MiB image as a data URI, and no more


class PayloadTooLarge(EngineError):
    error_type = "payload_too_large"
    http_status = 413


class Unauthorized(EngineError):
    error_type = "unauthorized"
    http_status = 401


def error_body(error: BaseException) -> dict[str, Any]:
    """fal's error JSON: {"detail", "error_type"}; for invalid input `detail` lists field errors as FastAPI does."""
    if isinstance(error, InvalidRequestError):
        items = getattr(error, "errors", None)
        if items:
            detail = [{"loc": ["body", *item.get("loc", ())], "msg": item.get("msg", ""), "type": item.get("type", ""),
                       **({"ctx": item["ctx"]} if item.get("ctx") else {})} for item in items]
            return json.loads(json.dumps({"detail": detail, "error_type": error.error_type}, default=str))
        return error.to_dict()
    if isinstance(error, EngineError):
        return error.to_dict()
    return {"detail": f"{type(error).__name__}: {error}", "error_type": "internal_error"}


def error_response(error: BaseException, request_id: str | None = None) -> JSONResponse:
    status = error.http_status if isinstance(error, EngineError) else 500
    headers = {"x-fal-error-type": error_type_of(error)}
    if request_id:
        headers["x-fal-request-id"] = request_id
    if isinstance(error, JobTimeoutError):
        headers["x-fal-request-timeout-type"] = "user"  # the client must not retry a timeout it asked for
    return JSONResponse(error_body(error), status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    """The JSON body, read with a size cap (uvicorn sets none)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InvalidRequestError("body", f"not valid JSON ({e})") from None


def _float_header(request: Request, name: str) -> float | None:
    value = request.headers.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        raise InvalidRequestError(name, "must be a number of seconds") from None


def create_app(engine: Any, *, api_key: str | None = None, allow_private_urls: bool = False,
               endpoint_overrides: Mapping[str, str] | None = None, files: FileStore | None = None,
               timeout_s: float | None = None, retention_s: float | None = None,
               state_dir: "str | Path | JobStore | None" = None, max_jobs: int | None = None,
               max_bytes: int | None = None) -> FastAPI:
    """The ASGI app serving `engine`. HTTP callers are untrusted: no local paths, no private URLs unless allowed.
    `retention_s` keeps results (and output files) that long after completion (default: an hour), at most `max_jobs`
    of them in at most `max_bytes`. `state_dir` (a folder or an open `JobStore`; None: a temporary one) holds the
    durable job store and, unless `files` is given, the output files: a server restarted on it serves completed
    results, re-runs queued jobs (at startup) and reports jobs that were running as `interrupted`."""
    queue = queue_for(engine, lambda: durable_queue(str(getattr(engine, "device", "device")), state_dir,
                                                    retention_s=retention_s, max_jobs=max_jobs, max_bytes=max_bytes))
    files = files or FileStore(queue.store.files_dir if queue.store and not queue.store.temporary else None,
                               ttl_s=retention_s or 3600.0)
    service = FalService(engine, endpoint_overrides=endpoint_overrides, allow_private_urls=allow_private_urls,
                         trusted=False, files=files, timeout_s=timeout_s, queue=queue)
    metrics = Metrics()
    expected = f"Key {api_key}".encode() if api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("missing or wrong API key (send `Authorization: Key <key>`)")

    app = FastAPI(title="engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics
    # the job store: queued jobs of the last run go again once the app starts (after the caller's policy is set)
    app.router.on_startup.append(lambda: queue.recover(service.resume) and None)
    app.router.on_shutdown.append(lambda: service.close(timeout=5.0))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return error_response(error)

    def track(job: Job) -> None:
        def done(j: Job) -> None:
            seconds = (j.finished_at or 0.0) - j.created_at
            metrics.done(j.app_id, seconds, error_type_of(j.error) if j.error is not None else None)

        job.add_done_callback(done)

    async def start(request: Request, app_id: str, kind: str, *, previews: bool = False,
                    webhook_url: str | None = None) -> Job:
        """Validate, fetch inputs and enqueue (in a thread), counting the request and any refusal."""
        try:
            app_id = service.table.spec(app_id).app_id
        except AppNotFoundError:
            metrics.failure("_unknown", AppNotFoundError.error_type)  # one label, whatever the path: bounded series
            raise
        metrics.request(app_id, kind)
        try:
            arguments = await _json_body(request)
            start_timeout = _float_header(request, TIMEOUT_HEADER)
            base_url = str(request.base_url)

            def submit() -> Job:
                call = service.prepare(app_id, arguments)
                return service.enqueue(call, base_url=base_url, webhook_url=webhook_url, want_previews=previews,
                                       start_timeout_s=start_timeout)

            job = await run_in_threadpool(submit)
        except EngineError as e:
            metrics.failure(app_id, e.error_type)
            raise
        track(job)
        return job

    def urls(request: Request, job: Job) -> dict[str, str]:
        base = f"{request.base_url}queue/{job.app_id}/requests/{job.id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    # -- unauthenticated ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        queued, running = service.queue.depth()
        body: dict[str, Any] = {"status": "ok", "queued": queued, "running": running}
        if expected is None:  # open servers also say what they serve; keyed ones tell anonymous callers no more
            body["device"] = str(getattr(engine, "device", ""))
            body["apps"] = {app: service.table.as_dict().get(app) for app in sorted(ENDPOINTS)}
        return body

    auth = [Depends(authorize)]

    @app.get("/metrics", dependencies=auth)
    async def get_metrics() -> PlainTextResponse:
        queued, running = service.queue.depth()
        return PlainTextResponse(metrics.render(queued, running), media_type="text/plain; version=0.0.4")

    @app.get("/files/{key}", dependencies=auth)
    async def get_file(key: str) -> Response:
        stored = service.files.get(key)
        if stored is None:
            return JSONResponse({"detail": "no such file (unknown or expired)", "error_type": "file_not_found"}, 404)
        return FileResponse(stored.path, media_type=stored.content_type, filename=stored.key)

    # -- queue --------------------------------------------------------------------------------------------------
    @app.get("/queue/{app_path:path}/requests/{request_id}/status", dependencies=auth)
    async def queue_status(request_id: str, logs: str = "false") -> JSONResponse:
        job = service.job(request_id)
        status = job_status(job, service.queue, with_logs=logs.lower() in ("true", "1", "yes"))
        return JSONResponse(status_json(status), headers={"x-fal-request-id": job.id})

    @app.get("/queue/{app_path:path}/requests/{request_id}", dependencies=auth)
    async def queue_result(request_id: str) -> JSONResponse:
        job = service.job(request_id)
        if not job.done:
            return JSONResponse({"detail": "request is still in progress", "error_type": "request_in_progress"},
                                400, headers={"x-fal-request-id": job.id})
        return _result_response(job)

    @app.put("/queue/{app_path:path}/requests/{request_id}/cancel", dependencies=auth)
    async def queue_cancel(request_id: str) -> JSONResponse:
        job = service.job(request_id)
        outcome = service.queue.cancel(job.id)
        headers = {"x-fal-request-id": job.id}
        if outcome == "completed":
            return JSONResponse({"status": "ALREADY_COMPLETED", "detail": "request already completed",
                                 "error_type": "already_completed"}, 400, headers=headers)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202, headers=headers)

    @app.post("/queue/{app_path:path}", dependencies=auth)
    async def queue_submit(app_path: str, request: Request, fal_webhook: str | None = None) -> JSONResponse:
        job = await start(request, app_path, "submit", webhook_url=fal_webhook)
        body = {"request_id": job.id, **urls(request, job), "status": "IN_QUEUE",
                "queue_position": service.queue.position(job) or 0}
        return JSONResponse(body, headers={"x-fal-request-id": job.id})

    # -- run and stream -----------------------------------------------------------------------------------------
    @app.post("/{app_path:path}", dependencies=auth)
    async def run(app_path: str, request: Request) -> Response:
        app_id = app_path.strip("/")
        if app_id.endswith("/stream") and app_id.removesuffix("/stream") in ENDPOINTS:
            return await _stream(request, app_id.removesuffix("/stream"))
        if app_id not in ENDPOINTS:
            raise AppNotFoundError(f"no app {app_id!r} on this server; known: {', '.join(sorted(ENDPOINTS))}")
        job = await start(request, app_id, "run")
        try:
            while not job.done:
                await wait_change_async(job, job.version, 1.0)
                if not job.done and await request.is_disconnected():
                    return Response(status_code=499)  # nobody to answer; `finally` frees the device
        finally:
            if not job.done:
                service.queue.cancel(job.id)
        return _result_response(job)

    async def _stream(request: Request, app_id: str) -> StreamingResponse:
        job = await start(request, app_id, "stream", previews=True)

        async def events() -> Any:
            try:
                async for event in service.follow_async(job):
                    yield f"data: {json.dumps(event)}\n\n"
            except Exception as e:  # noqa: BLE001 - the status line is sent; the error becomes the last event
                yield f"data: {json.dumps({'type': 'error', **error_body(e)})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-fal-request-id": job.id, "cache-control": "no-cache"})

    return app


def _result_response(job: Job) -> JSONResponse:
    try:
        result = job_result(job)
    except BaseException as e:  # noqa: BLE001 - the job's error, answered with its status
        return error_response(e, job.id)
    return JSONResponse(result, headers={"x-fal-request-id": job.id})


__all__ = ["create_app", "error_body", "RequestNotFoundError"]
