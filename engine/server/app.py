"""The ASGI app: fal's run, stream and queue protocols over one engine, plus files, health, metrics and Key auth.

Point the official client here with `FAL_RUN_HOST=H:P` and `FAL_QUEUE_RUN_HOST=H:P/queue`. Routes:
  POST /{app_id}                                  run, answers the result
  POST /{app_id}/stream                           server-sent events: progress..., then the result (a comment line
                                                  keeps a long-queued stream alive)
  POST /queue/{app_id}[?fal_webhook=URL]          submit
  GET  /queue/{any}/requests/{id}/status?logs=    status      (looked up by id: the client drops sub-paths)
  GET  /queue/{any}/requests/{id}                 result
  PUT  /queue/{any}/requests/{id}/cancel          cancel
  GET  /files/{key}  GET /health  GET /metrics  GET /openapi.json
and, from `surface.py`: the storage (upload) routes, GET .../requests/{id}/status/stream (SSE), POST /tokens/ and
the /{app_id}/realtime websocket, signed webhooks, and OpenAI's /v1/images/generations, /v1/images/edits, /v1/models.
Every app id gets its own run, stream and submit routes, so `/openapi.json` lists each with its input schema (the
endpoint's pydantic model, the one that validates the body before any engine code runs) and its output schema.
Validation, input fetching and encoding run in worker threads; the event loop only routes and waits. No exception
escapes the app: an unexpected one is logged and answered as a 500 with fal's error JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..endpoints import ENDPOINTS, EndpointSpec
from ..errors import (AppNotFoundError, EngineError, InvalidRequestError, JobTimeoutError, PayloadTooLargeError,
                      RequestNotFoundError, UnauthorizedError, error_type_of)
from ..requests import invalid_from_validation
from ..runtime.files import FileStore
from ..runtime.jobstore import JobStore
from ..runtime.queue import Job, durable_queue, queue_for
from ..service import FalService, job_result, job_status, status_json, wait_change_async
from . import schemas
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .pages import add_page_routes
from .status_stream import with_keepalive
from .surface import add_surface_routes, local_inputs

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-fal-request-timeout"
MAX_BODY_BYTES = 96 * 1024 * 1024  # room for a 64 MiB image as a data URI, and no more
MAX_WEBHOOK_URL = 2048


def _invalid_body(message: str, kind: str) -> InvalidRequestError:
    """A 422 on the body as a whole, in FastAPI's field-error shape (`loc: ["body"]`)."""
    error = InvalidRequestError("body", message)
    error.errors = [{"loc": (), "msg": message, "type": kind}]  # type: ignore[attr-defined]
    return error


def error_body(error: BaseException) -> dict[str, Any]:
    """fal's error JSON: {"detail", "error_type"}; for invalid input `detail` lists field errors as FastAPI does."""
    if isinstance(error, InvalidRequestError):
        items = getattr(error, "errors", None)
        if items:
            detail = [{"loc": ["body", *item.get("loc", ())], "msg": item.get("msg", ""), "type": item.get("type", ""),
                       **({"ctx": item["ctx"]} if item.get("ctx") else {})} for item in items]
            return _json_safe({"detail": detail, "error_type": error.error_type})
        return error.to_dict()
    if isinstance(error, EngineError):
        return error.to_dict()
    return {"detail": f"{type(error).__name__}: {error}", "error_type": "internal_error"}


def _json_safe(value: Any) -> Any:
    """`value` through JSON and back: unknown objects as text, non-finite floats as text (JSON has neither)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.loads(json.dumps(clean(value), default=str))


def error_response(error: BaseException, request_id: str | None = None) -> JSONResponse:
    status = error.http_status if isinstance(error, EngineError) else 500
    headers = {"x-fal-error-type": error_type_of(error)}
    if request_id:
        headers["x-fal-request-id"] = request_id
    if isinstance(error, JobTimeoutError):
        headers["x-fal-request-timeout-type"] = "user"  # the client must not retry a timeout it asked for
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


async def _json_body(request: Request) -> Any:
    """The JSON body, read with a size cap (uvicorn sets none). Empty is `{}`; anything that is not strict JSON
    (broken, NaN/Infinity, nested past the parser's depth, a non-JSON content type) is a 422 on `body`."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise _invalid_body(f"the body must be JSON (content-type application/json), not {content_type[:100]!r}",
                            "content_type")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise _invalid_body("not valid JSON (nested too deeply)", "json_invalid") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise _invalid_body(f"not valid JSON ({str(e)[:200]})", "json_invalid") from None


def validate_arguments(spec: EndpointSpec, arguments: Any) -> tuple[dict[str, Any], list[str]]:
    """`arguments` checked against the endpoint's schema: (the declared arguments, the unknown names). Unknown
    arguments are ignored, as fal's apps do (the job log names them): they never reach the engine."""
    if not isinstance(arguments, dict):
        raise _invalid_body("the arguments must be a JSON object", "model_type")
    try:
        model = spec.schema.model_validate(arguments)
    except ValidationError as e:
        raise invalid_from_validation(e, spec.schema) from None
    except RecursionError:
        raise _invalid_body("nested too deeply", "value_error") from None
    extra = sorted(model.model_extra or {})
    return {k: v for k, v in arguments.items() if k not in extra}, extra


def _float_header(request: Request, name: str) -> float | None:
    value = request.headers.get(name)
    try:
        seconds = float(value) if value else None
    except ValueError:
        raise InvalidRequestError(name, "must be a number of seconds") from None
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequestError(name, "must be a positive, finite number of seconds")
    return seconds


def _check_webhook_syntax(url: str) -> None:
    """What the service's SSRF check assumes of the URL (it parses the port and resolves the host)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
        (parts.hostname or "").encode("idna")
    except (ValueError, UnicodeError):
        raise InvalidRequestError("fal_webhook", "not a valid URL") from None
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidRequestError("fal_webhook", "control characters or spaces in the URL")
    if len(url) > MAX_WEBHOOK_URL or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError("fal_webhook", "must be an http(s) URL", f"at most {MAX_WEBHOOK_URL} characters")


class CatchAll:
    """Outermost app middleware: an exception nothing else handled is logged and answered as a 500 with fal's
    error JSON (if the response has not started), so no connection is dropped and nothing reaches the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the point of this middleware
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # the status line is out: nothing to answer with; end the body cleanly
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:  # noqa: BLE001 - the client is gone
                    pass
                return
            response = JSONResponse({"detail": "internal server error (logged on the server)",
                                     "error_type": "internal_error"}, status_code=500,
                                    headers={"x-fal-error-type": "internal_error"})
            await response(scope, receive, send)


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
    metrics = Metrics(depth=service.queue.depth, replicas=getattr(engine, "replica_stats", None))
    expected = f"Key {api_key}".encode() if api_key else None
    # fal's header is `Authorization: Key <key>`: an API key in a header, whole value compared (not a bearer token)
    key_header = APIKeyHeader(name="Authorization", scheme_name="FalKey", auto_error=False,
                              description="`Key <api key>` (fal's form); required when the server has a key")

    def key_ok(given: str | None) -> bool:
        return expected is None or hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), expected)

    async def authorize(given: str | None = Security(key_header)) -> None:
        if not key_ok(given):
            raise UnauthorizedError("missing or wrong API key (send `Authorization: Key <key>`)")

    app = FastAPI(title="engine", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="fal-compatible run, stream and queue routes over a local diffusion engine")
    app.state.service = service
    app.state.metrics = metrics
    # the job store: queued jobs of the last run go again once the app starts (after the caller's policy is set)
    app.router.on_startup.append(lambda: queue.recover(service.resume) and None)
    app.router.on_shutdown.append(lambda: service.close(timeout=5.0))
    app.add_middleware(CatchAll)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in error.errors()]
        return JSONResponse(_json_safe({"detail": detail, "error_type": "invalid_request"}), 422,
                            headers={"x-fal-error-type": "invalid_request"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"detail": str(error.detail), "error_type": kind}, error.status_code,
                            headers={**(error.headers or {}), "x-fal-error-type": kind})

    def track(job: Job) -> None:
        def done(j: Job) -> None:
            seconds = (j.finished_at or 0.0) - j.created_at
            metrics.done(j.app_id, seconds, error_type_of(j.error) if j.error is not None else None)

        job.add_done_callback(done)

    async def start(request: Request, app_id: str, kind: str, *, previews: bool = False,
                    webhook_url: str | None = None) -> Job:
        """Read and validate the body against the app's schema (422 before any engine code), then prepare (fetch
        inputs) and enqueue in a thread, counting the request and any refusal."""
        try:
            spec = service.table.spec(app_id)
        except AppNotFoundError:
            metrics.failure("_unknown", AppNotFoundError.error_type)  # one label, whatever the path: bounded series
            raise
        app_id = spec.app_id
        metrics.request(app_id, kind)
        try:
            if webhook_url is not None:
                _check_webhook_syntax(webhook_url)
            arguments, ignored = validate_arguments(spec, await _json_body(request))
            start_timeout = _float_header(request, TIMEOUT_HEADER)
            base_url = str(request.base_url)

            def submit() -> Job:
                with local_inputs(service.files, surface.own_bases(base_url)):  # our file URLs: read, not fetched
                    call = service.prepare(app_id, arguments)
                if ignored:
                    call.notes.insert(0, f"ignored unknown arguments: {', '.join(ignored)}")
                return service.enqueue(call, base_url=base_url, webhook_url=webhook_url, want_previews=previews,
                                       start_timeout_s=start_timeout)

            job = await run_in_threadpool(submit)
        except EngineError as e:
            metrics.failure(app_id, e.error_type)
            raise
        except Exception:
            metrics.failure(app_id, "internal_error")
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

    auth = [Security(authorize)]

    # the schema names the apps, so a keyed server shows it to key holders only (as /health does)
    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/metrics", dependencies=auth, responses={200: {"content": {"text/plain": {}}}})
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/files/{key}", dependencies=auth, responses={200: {"content": {"image/*": {}}},
                                                           **schemas.error_responses(401, 404)})
    async def get_file(key: str) -> Response:
        stored = service.files.get(key)
        if stored is None:
            return JSONResponse({"detail": "no such file (unknown or expired)", "error_type": "file_not_found"}, 404)
        return FileResponse(stored.path, media_type=stored.content_type, filename=stored.key)

    # -- queue: status, result, cancel (by id, whatever app path the client sends) --------------------------------
    @app.get("/queue/{app_path:path}/requests/{request_id}/status", dependencies=auth,
             response_model=schemas.QueueStatus, responses=schemas.error_responses(401, 404))
    async def queue_status(app_path: str, request_id: str, logs: str = "false") -> JSONResponse:
        job = service.job(request_id)
        status = job_status(job, service.queue, with_logs=logs.lower() in ("true", "1", "yes"))
        return JSONResponse(status_json(status), headers={"x-fal-request-id": job.id})

    @app.get("/queue/{app_path:path}/requests/{request_id}", dependencies=auth,
             responses={200: {"description": "the app's output (see its run route)"},
                        **schemas.error_responses(400, 401, 404, 422, 500)})
    async def queue_result(app_path: str, request_id: str) -> JSONResponse:
        job = service.job(request_id)
        if not job.done:
            return JSONResponse({"detail": "request is still in progress", "error_type": "request_in_progress"},
                                400, headers={"x-fal-request-id": job.id})
        return _result_response(job)

    @app.put("/queue/{app_path:path}/requests/{request_id}/cancel", dependencies=auth, status_code=202,
             response_model=schemas.CancelResponse,
             responses={400: {"model": schemas.CancelResponse, "description": "already completed"},
                        **schemas.error_responses(401, 404)})
    async def queue_cancel(app_path: str, request_id: str) -> JSONResponse:
        job = service.job(request_id)
        outcome = service.queue.cancel(job.id)
        headers = {"x-fal-request-id": job.id}
        if outcome == "completed":
            return JSONResponse({"status": "ALREADY_COMPLETED", "detail": "request already completed",
                                 "error_type": "already_completed"}, 400, headers=headers)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202, headers=headers)

    # -- per app: submit, run, stream ---------------------------------------------------------------------------
    async def submit(request: Request, app_id: str, fal_webhook: str | None) -> JSONResponse:
        job = await start(request, app_id, "submit", webhook_url=fal_webhook)
        body = {"request_id": job.id, **urls(request, job), "status": "IN_QUEUE",
                "queue_position": service.queue.position(job) or 0}
        return JSONResponse(body, headers={"x-fal-request-id": job.id})

    async def run(request: Request, app_id: str) -> Response:
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

    async def stream(request: Request, app_id: str) -> StreamingResponse:
        job = await start(request, app_id, "stream", previews=True)

        async def events() -> Any:
            try:
                async for event in with_keepalive(service.follow_async(job)):
                    yield ": keep-alive\n\n" if event is None else f"data: {json.dumps(_json_safe(event))}\n\n"
            except Exception as e:  # noqa: BLE001 - the status line is sent; the error becomes the last event
                yield f"data: {json.dumps({'type': 'error', **_json_safe(error_body(e))})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-fal-request-id": job.id, "cache-control": "no-cache"})

    add_page_routes(app, service, auth=auth)  # GET /, /analytics and their data routes
    # uploads, status streaming, realtime, webhooks, OpenAI images API (before the catch-all POST below)
    surface = add_surface_routes(app, service, auth=auth, key_ok=key_ok, api_key=api_key, metrics=metrics)
    app.state.surface = surface
    for spec in ENDPOINTS.values():
        _add_app_routes(app, spec, auth, submit=submit, run=run, stream=stream)

    # anything else under POST: a trailing slash on a known app, or an unknown app (404)
    @app.post("/queue/{app_path:path}", dependencies=auth, include_in_schema=False)
    async def queue_submit_any(app_path: str, request: Request, fal_webhook: str | None = None) -> JSONResponse:
        return await submit(request, app_path.strip("/"), fal_webhook)

    @app.post("/{app_path:path}", dependencies=auth, include_in_schema=False)
    async def run_any(app_path: str, request: Request) -> Response:
        app_id = app_path.strip("/")
        if app_id.endswith("/stream") and app_id.removesuffix("/stream") in ENDPOINTS:
            return await stream(request, app_id.removesuffix("/stream"))
        if app_id not in ENDPOINTS:
            metrics.failure("_unknown", AppNotFoundError.error_type)
            raise AppNotFoundError(f"no app {app_id!r} on this server; known: {', '.join(sorted(ENDPOINTS))}")
        return await run(request, app_id)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _body_doc(spec: EndpointSpec) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{spec.schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _add_app_routes(app: FastAPI, spec: EndpointSpec, auth: list[Any], *,
                    submit: Callable[[Request, str, str | None], Awaitable[JSONResponse]],
                    run: Callable[[Request, str], Awaitable[Response]],
                    stream: Callable[[Request, str], Awaitable[Response]]) -> None:
    """POST /{app_id}, /{app_id}/stream and /queue/{app_id}, documented with the app's input and output models.
    The body is read and validated by `start` (size cap, strict JSON, the schema), not by FastAPI."""
    app_id, output = spec.app_id, schemas.OUTPUTS[spec.task]
    errors = schemas.error_responses(401, 413, 422, 500)
    name = app_id.replace("/", "_").replace("-", "_")
    tag = [app_id]

    async def run_route(request: Request) -> Response:
        return await run(request, app_id)

    async def stream_route(request: Request) -> Response:
        return await stream(request, app_id)

    async def submit_route(request: Request, fal_webhook: str | None = None) -> JSONResponse:
        return await submit(request, app_id, fal_webhook)

    app.add_api_route(f"/{app_id}", run_route, methods=["POST"], dependencies=auth, tags=tag,
                      operation_id=f"run_{name}", summary=f"run {app_id}: wait and answer the result",
                      openapi_extra=_body_doc(spec), response_class=JSONResponse,
                      responses={200: {"model": output, "description": "the result"}, **errors})
    stream_doc = {"description": "server-sent events: `data: <ProgressEvent JSON>` per step, then one with the "
                                 "result (or `{type: error, detail, error_type}`); the stream then ends",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    app.add_api_route(f"/{app_id}/stream", stream_route, methods=["POST"], dependencies=auth, tags=tag,
                      operation_id=f"stream_{name}", summary=f"stream {app_id}: progress events, then the result",
                      openapi_extra=_body_doc(spec), responses={200: stream_doc, **errors})
    app.add_api_route(f"/queue/{app_id}", submit_route, methods=["POST"], dependencies=auth, tags=tag,
                      operation_id=f"submit_{name}", summary=f"submit {app_id} to the queue",
                      openapi_extra=_body_doc(spec), response_model=schemas.SubmitResponse,
                      responses=errors)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the input models (referenced from each app route's request body), generated once."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        inputs: list[type[BaseModel]] = list(dict.fromkeys(spec.schema for spec in ENDPOINTS.values()))
        extra = [schemas.ProgressEvent]
        _, defs = models_json_schema([(m, "validation") for m in inputs] + [(m, "serialization") for m in extra],
                                     ref_template="#/components/schemas/{model}")
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for key, value in defs.get("$defs", {}).items():
            components.setdefault(key, value)
        app.openapi_schema = doc
    return app.openapi_schema


def _result_response(job: Job) -> JSONResponse:
    try:
        result = job_result(job)
    except BaseException as e:  # noqa: BLE001 - the job's error, answered with its status
        return error_response(e, job.id)
    return JSONResponse(result, headers={"x-fal-request-id": job.id})


__all__ = ["create_app", "error_body", "RequestNotFoundError"]
