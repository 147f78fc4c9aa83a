"""The browser pages of `engine serve`: a playground (`GET /`) and an analytics page (`GET /analytics`).

The pages are static files shipped in the package (`static/`: HTML, CSS, plain JS and a vendored uPlot; no build
step, nothing loaded from outside the server, a `default-src 'self'` CSP). They hold no data: everything comes from
three JSON routes that sit behind the API key like every other route:
  GET /ui/api/endpoints            every app: task, served model, input JSON schema (the pydantic model that validates
                                   its requests: the playground builds its form from it)
  GET /ui/api/report?app=APP       the optimization report (applied / skipped passes, memory plan) of the app's
                                   model when it is loaded (the page does not load a model to show it)
  GET /ui/api/analytics?window=S   per-app requests, success rate, latency and queue-wait percentiles, errors by type,
                                   recent failures, chart series (`analytics.py`, from the job store)
The key typed into the pages' login form stays in the browser's sessionStorage and goes out as `Authorization: Key`.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..endpoints import ENDPOINTS
from ..errors import AppNotFoundError, InvalidRequestError
from .analytics import MAX_WINDOW_S, MIN_WINDOW_S, Window, build_analytics

STATIC_DIR = Path(__file__).parent / "static"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                "cache-control": "no-cache"}
PAGES = {"/": "playground.html", "/analytics": "analytics.html"}


def static_files() -> dict[str, Path]:
    """Name under /ui/static/ -> file, for every file shipped in `static/` (the only files these routes serve)."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in sorted(STATIC_DIR.rglob("*")) if p.is_file()}


def _served_models(choice: Any) -> list[str]:
    if isinstance(choice, dict):
        return [str(m) for m in dict.fromkeys(choice.values()) if m]
    return [str(choice)] if choice else []


def add_page_routes(app: FastAPI, service: Any, *, auth: list[Any]) -> None:
    """Register the pages, their static files and their JSON routes on `app`."""
    files = static_files()
    engine = service.engine

    def page_route(name: str) -> Any:
        async def page() -> FileResponse:
            return FileResponse(files[name], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
        return page

    for path, name in PAGES.items():
        app.add_api_route(path, page_route(name), methods=["GET", "HEAD"], include_in_schema=False)

    @app.get("/ui/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> Any:
        path = files.get(name)
        if path is None:
            return JSONResponse({"detail": "no such file", "error_type": "not_found"}, 404)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.startswith("text/") or media.endswith("javascript"):
            media += "; charset=utf-8"
        return FileResponse(path, media_type=media, headers=PAGE_HEADERS)

    @app.get("/ui/api/endpoints", dependencies=auth, include_in_schema=False)
    async def endpoints() -> JSONResponse:
        table = service.table.as_dict()
        loaded = set(await run_in_threadpool(engine.loaded_models))
        body = [{"app_id": spec.app_id, "task": spec.task, "models": _served_models(table.get(spec.app_id)),
                 "loaded": [m for m in _served_models(table.get(spec.app_id)) if m in loaded],
                 "input_schema": spec.schema.model_json_schema(mode="validation")}
                for spec in sorted(ENDPOINTS.values(), key=lambda s: s.app_id)]
        return JSONResponse({"endpoints": body})

    @app.get("/ui/api/report", dependencies=auth, include_in_schema=False)
    async def report(app_id: str = Query(alias="app")) -> JSONResponse:
        if app_id not in ENDPOINTS:
            raise AppNotFoundError(f"no app {app_id!r} on this server")

        def collect() -> list[dict[str, Any]]:
            loaded = set(engine.loaded_models())
            out = []
            for model in _served_models(service.table.as_dict().get(app_id)):
                report = engine.optimization_report(model, load=False) if model in loaded else None
                # shown only when loaded (behind replicas: on the replica asked); a look never loads a model
                entry: dict[str, Any] = {"model": model, "loaded": report is not None}
                if report is not None:
                    entry["report"] = report.as_dict()
                out.append(entry)
            return out

        return JSONResponse({"app_id": app_id, "models": await run_in_threadpool(collect)})

    @app.get("/ui/api/analytics", dependencies=auth, include_in_schema=False)
    async def analytics(window: float = 3600.0) -> JSONResponse:
        if not (MIN_WINDOW_S <= window <= MAX_WINDOW_S):
            raise InvalidRequestError("window", f"must be between {MIN_WINDOW_S:.0f} and {MAX_WINDOW_S:.0f} seconds")
        span = Window.last(window)
        store = service.queue.store

        def collect() -> dict[str, Any]:
            jobs = store.timings_since(span.start) if store is not None else []
            return build_analytics(jobs, span, ENDPOINTS)

        body = await run_in_threadpool(collect)
        body["retention_s"] = getattr(service.queue, "retention_s", None)
        return JSONResponse(body)
