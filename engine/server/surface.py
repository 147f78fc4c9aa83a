"""The rest of fal's client surface on the server app, in one place: uploads (storage routes), status streaming,
realtime tokens and websocket, signed webhooks, and OpenAI's images API. `add_surface_routes` registers them (before
the app's catch-all POST route) over the same service, file store, queue and key as fal's run/queue routes.

Inputs that name this server's own file URLs (`{server}/files/{id}`: an upload's `file_url`, or an earlier output)
are read from the file store, never fetched: `local_inputs(...)` wraps every `prepare` (fal routes, realtime,
OpenAI). "Own" means the request's base URL, plus any `public_urls` the operator names (`engine serve --public-url`,
for a server behind a proxy). `/fal/proxy` makes the server its own `proxyUrl` for the JS client.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .. import net
from ..endpoints import ENDPOINTS, PreparedCall, load_image_argument
from ..loading import as_caller, check_untrusted_model
from ..registry import find_spec, registry
from ..requests import GenerateRequest, parse_request
from ..runtime.files import FileStore
from ..runtime.webhooks import WebhookSender
from ..service import job_result, wait_change_async
from .openai_api import OpenAIConfig, OpenAIError, add_openai_routes
from .realtime import RealtimeConfig, RealtimeContext, serve_realtime
from .status_stream import status_events, truthy
from .storage import add_storage_routes, small_body
from .tokens import TokenSigner, parse_token_request

# OpenAI edits run as one engine call (image-to-image, or inpainting with a mask) on the model behind the named app
EDIT_APP = "openai/images/edits"
EDIT_FIELDS = frozenset({"num_inference_steps", "seed", "guidance_scale", "negative_prompt", "format"})


PROXY_PATH = "/fal/proxy"
FAL_HOSTS = {"fal.run": "", "queue.fal.run": "/queue", "rest.fal.ai": ""}  # fal's host -> our path prefix


class FalProxyPath:
    """ASGI middleware: `{server}/fal/proxy` with `x-fal-target-url: https://{fal host}/{path}` (what the JS client's
    `proxyUrl` sends) is routed as a request for that path on this server. Only fal's own hosts are mapped, and
    nothing is fetched: any other target is a 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PROXY_PATH:
            headers = dict(scope.get("headers") or [])
            try:
                target = urllib.parse.urlsplit(headers.get(b"x-fal-target-url", b"").decode("latin-1"))
                prefix = FAL_HOSTS.get((target.hostname or "").lower()) if target.scheme == "https" else None
            except ValueError:  # e.g. a broken IPv6 literal
                prefix = None
            if prefix is None:
                response = JSONResponse({"detail": "x-fal-target-url must be an https URL on fal.run, queue.fal.run "
                                                   "or rest.fal.ai", "error_type": "invalid_request"}, 400)
                await response(scope, receive, send)
                return
            path = prefix + (target.path or "/")
            scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": target.query.encode()}
        await self.app(scope, receive, send)


@contextlib.contextmanager
def local_inputs(files: FileStore, base_urls: list[str]) -> Iterator[None]:
    """Within this block, image inputs naming this server's files are read from `files` (no network)."""
    with net.local_urls(lambda url: files.read_local(url, base_urls)):
        yield


@dataclass
class Surface:
    """What the extra routes share: the signer (tokens), the operator's public URLs, the open upload slots."""

    signer: TokenSigner
    public_urls: list[str] = field(default_factory=list)
    slots: Any = None

    def own_bases(self, base_url: str) -> list[str]:
        return [base_url, *self.public_urls]


def add_surface_routes(app: FastAPI, service: Any, *, auth: list[Any], key_ok: Callable[[str | None], bool],
                       api_key: str | None, metrics: Any = None) -> Surface:
    """Register uploads, status streaming, tokens, realtime and the OpenAI routes; sign webhooks with `api_key`."""
    requires_auth = api_key is not None
    surface = Surface(TokenSigner(api_key))
    files: FileStore = service.files
    engine = service.engine
    service.webhooks = WebhookSender(key=api_key, allow_private=service.allow_private_urls)

    def prepare(app_id: str, arguments: Any, base_url: str) -> Any:
        with local_inputs(files, surface.own_bases(base_url)):
            return service.prepare(app_id, arguments)

    app.add_middleware(FalProxyPath)  # the JS client's proxyUrl: {server}/fal/proxy

    # -- uploads ------------------------------------------------------------------------------------------------
    surface.slots = add_storage_routes(app, files, surface.signer, auth, key_ok, requires_auth)

    # -- status streaming ---------------------------------------------------------------------------------------
    @app.get("/queue/{app_path:path}/requests/{request_id}/status/stream", dependencies=auth, tags=["queue"],
             summary="the request's status as server-sent events, ending after COMPLETED",
             responses={200: {"content": {"text/event-stream": {}}}})
    async def status_stream(app_path: str, request_id: str, request: Request, logs: str = "0") -> StreamingResponse:
        job = service.job(request_id)
        base = f"{request.base_url}queue/{job.app_id}/requests/{job.id}"
        urls = {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}
        events = status_events(job, service.queue, with_logs=truthy(logs), urls=urls,
                               disconnected=request.is_disconnected)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"x-fal-request-id": job.id, "cache-control": "no-cache"})

    # -- realtime -----------------------------------------------------------------------------------------------
    @app.post("/tokens/", dependencies=auth, tags=["realtime"],
              summary="a short-lived token for the realtime socket of the apps named (fal's aliases or ids)")
    @app.post("/tokens", dependencies=auth, include_in_schema=False)
    async def tokens(request: Request) -> JSONResponse:
        try:
            body = json.loads(await small_body(request) or b"{}")
        except ValueError:
            body = None
        apps, ttl = parse_token_request(body)
        token, _ = surface.signer.issue("realtime", apps, ttl)
        return JSONResponse(token)

    def execute(call: Any, ctx: RealtimeContext, base_url: str) -> dict[str, Any]:
        caller = getattr(call, "caller", None) or service.caller_policy
        with as_caller(caller):
            result = call.execute(engine, ctx)
        return call.render(result, files, base_url)

    realtime_config = RealtimeConfig(prepare=prepare, execute=execute, key_ok=key_ok, signer=surface.signer,
                                     known=lambda path: service.table.spec(path).app_id,
                                     requires_auth=requires_auth)

    @app.websocket("/{app_path:path}/realtime")
    async def realtime(websocket: WebSocket, app_path: str) -> None:
        if metrics is not None:
            metrics.request(app_path.strip("/") if app_path.strip("/") in ENDPOINTS else "_unknown", "realtime")
        await serve_realtime(websocket, app_path, realtime_config)

    # -- OpenAI images API --------------------------------------------------------------------------------------
    def text_to_image_apps() -> list[str]:
        return [app_id for app_id, spec in ENDPOINTS.items() if spec.task == "text-to-image"]

    def resolve(model: str, task: str) -> tuple[str, dict[str, Any]]:
        app_id, base = _text_to_image_target(model)
        if task == "generate":
            return app_id, base
        model_id = base.get("model_name") or service.table.model_for(app_id)
        if not model_id:
            raise OpenAIError(400, f"{app_id} has no model configured on this server", param="model",
                              code="unsupported_model")
        return EDIT_APP, {"model": model_id, "app": app_id}

    def _text_to_image_target(model: str) -> tuple[str, dict[str, Any]]:
        if model in ENDPOINTS:
            if ENDPOINTS[model].task != "text-to-image":
                raise OpenAIError(400, f"{model!r} is not a text-to-image app", param="model", code="unsupported_model")
            return model, {}
        spec = find_spec(model)
        if spec is None and "/" not in model:
            raise OpenAIError(404, f"The model {model!r} does not exist on this server (GET /v1/models lists them)",
                              param="model", code="model_not_found")
        if spec is not None and spec.family_spec.task != "text-to-image":
            raise OpenAIError(400, f"{model!r} is not a text-to-image model", param="model", code="unsupported_model")
        for app_id in text_to_image_apps():  # the app the operator mapped to this model, if any
            if app_id != "fal-ai/lora" and service.table.model_for(app_id) == model:
                return app_id, {}
        return "fal-ai/lora", {"model_name": model}  # any model by name (the caller policy still applies)

    def schema_fields(app_id: str) -> frozenset[str]:
        return EDIT_FIELDS if app_id == EDIT_APP else frozenset(ENDPOINTS[app_id].schema.model_fields)

    async def run(request: Request, app_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        base_url = str(request.base_url)
        if metrics is not None:
            metrics.request(arguments["app"] if app_id == EDIT_APP else app_id, "openai")

        def submit() -> Any:
            call = prepare_edit(service, arguments) if app_id == EDIT_APP else prepare(app_id, arguments, base_url)
            return service.enqueue(call, base_url=base_url)

        job = await run_in_threadpool(submit)
        try:
            while not job.done:
                await wait_change_async(job, job.version, 1.0)
                if not job.done and await request.is_disconnected():
                    break
        finally:
            if not job.done:
                service.queue.cancel(job.id)
        return job_result(job)

    def models() -> list[dict[str, Any]]:
        listed = [{"id": app_id, "object": "model", "created": 0, "owned_by": "engine"}
                  for app_id in text_to_image_apps() if app_id == "fal-ai/lora" or service.table.model_for(app_id)]
        listed += [{"id": spec.id, "object": "model", "created": 0, "owned_by": spec.family}
                   for spec in registry().values() if spec.family_spec.task == "text-to-image"]
        return listed

    add_openai_routes(app, OpenAIConfig(resolve=resolve, schema_fields=schema_fields, run=run, key_ok=key_ok,
                                        requires_auth=requires_auth, models=models))
    return surface


def prepare_edit(service: Any, arguments: dict[str, Any]) -> PreparedCall:
    """An OpenAI edit as one engine call: `image` (+ `strength`) is image-to-image, with `mask_url` inpainting (white
    repaints). Without a size the output has the input's size, rounded down to the model family's size multiple."""
    if "image" not in GenerateRequest.model_fields:
        raise OpenAIError(501, "image-to-image is not in this engine build", code="not_implemented")
    model: str = arguments["model"]
    spec = find_spec(model)
    policy = service.caller_policy
    if not policy.trusted:
        if model in service._operator_models():
            policy = policy.with_pinned(model)
        else:
            check_untrusted_model(model, policy, field="model")
    image = load_image_argument(arguments["image_url"], allow_private_urls=False, field_name="image")
    mask = (load_image_argument(arguments["mask_url"], allow_private_urls=False, field_name="mask")
            if arguments.get("mask_url") else None)
    size = arguments.get("image_size")
    if size:
        width, height = size["width"], size["height"]
    else:
        multiple = spec.family_spec.size_multiple if spec is not None else 8
        width, height = image.width // multiple * multiple, image.height // multiple * multiple
    fields: dict[str, Any] = {"model": model, "prompt": arguments["prompt"], "width": width, "height": height,
                              "num_images": arguments["num_images"], "image": image.convert("RGB")}
    for name in ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "strength"):
        if arguments.get(name) is not None:
            fields[name] = arguments[name]
    if mask is not None:
        fields["mask_image"] = mask.convert("L")
    request = parse_request(GenerateRequest, fields)
    if spec is not None and spec.family_spec.task == "text-to-image":
        request.validate_for_family(spec.family_spec, width, height)
    fmt, sync_mode = arguments.get("format", "png"), bool(arguments.get("sync_mode"))

    def execute(engine: Any, ctx: Any) -> Any:
        def on_step(i: int, n: int, latents: Any) -> None:
            ctx.progress(i + 1, n)

        return engine.generate(request, step_callback=on_step)

    def render(result: Any, store: FileStore, base_url: str | None) -> dict[str, Any]:
        return {"images": [store.image_object(im, fmt, sync_mode=sync_mode, base_url=base_url)
                           for im in result.images], "seed": result.seed, "timings": result.timings}

    call = PreparedCall(arguments["app"], model, execute, render,
                        ["inpainting" if mask is not None else "image-to-image", f"openai edit on {model}"])
    call.caller = policy  # type: ignore[attr-defined]
    return call
