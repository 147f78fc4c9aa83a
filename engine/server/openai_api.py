"""OpenAI's images API over the engine, for the many tools that speak it (the official `openai` package included).

  POST /v1/images/generations   JSON: model, prompt, n (1..8), size ("WxH" | "auto"), response_format (url |
                                b64_json), output_format (png | jpeg), quality, style, user, background
  POST /v1/images/edits         multipart: image (or image[]), mask (optional), prompt, model, n, size,
                                response_format, strength (ours, 0..1): image-to-image, or inpainting with a mask
  GET  /v1/models               the app ids and registry models this server can run

`model` names an app id this server serves (`fal-ai/fast-sdxl`) or a registry model (`tiny-sd15`, `sdxl-base`): a
registry model runs on the app the operator mapped to it, else on `fal-ai/lora` (which takes any model by name).
Without `model`: `DEFAULT_MODEL`. `quality`, `style`, `background` and `user` are accepted (checked against OpenAI's
values) and ignored: the steps are the app's default unless `num_inference_steps` is given. Our extensions, sent
as extra body fields: `seed`, `num_inference_steps`, `guidance_scale`, `negative_prompt`, `strength`.
`size: "auto"` is the app's default size. `url` answers are this server's `/files/...` URLs; `b64_json` inlines PNG
or JPEG bytes. Every request goes through the same job queue as fal's routes, and the same auth: the server's key as
`Authorization: Bearer <key>` (OpenAI's form) or `Key <key>`. Errors use OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` (invalid input: 400 `invalid_request_error` naming the param).
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import EngineError, InvalidRequestError

DEFAULT_MODEL = "fal-ai/fast-sdxl"
QUALITIES = {"standard", "hd", "low", "medium", "high", "xhigh", "max", "auto"}
STYLES = {"vivid", "natural"}
BACKGROUNDS = {"transparent", "opaque", "auto"}
FORMATS = {"png", "jpeg"}
EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt")
MAX_N = 8
MAX_FORM_BYTES = 64 * 1024 * 1024
MAX_JSON_BYTES = 1 << 20
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, self.status)


def openai_error(error: BaseException) -> OpenAIError:
    """Any failure in OpenAI's error shape (engine errors keep their status, invalid input is a 400)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, InvalidRequestError):
        param = getattr(error, "field", None)
        return OpenAIError(400, str(error), "invalid_request_error", param, error.error_type)
    if isinstance(error, EngineError):
        kind = "authentication_error" if error.http_status == 401 else (
            "invalid_request_error" if error.http_status < 500 else "server_error")
        return OpenAIError(error.http_status, str(error), kind, None, error.error_type)
    return OpenAIError(500, f"internal error: {type(error).__name__}", "server_error", None, "internal_error")


@dataclass
class Target:
    """Where an OpenAI request runs: the app and the arguments its schema wants (besides the prompt)."""

    app_id: str
    fields: frozenset[str]
    base: dict[str, Any]


@dataclass
class OpenAIConfig:
    """What the routes need from the app.
    `resolve(model, task)` -> (app id, extra arguments) or raises `OpenAIError` (404 unknown model);
    `schema_fields(app_id)` -> the app's argument names; `run(request, app_id, arguments)` -> the result JSON
    (queued like any request, cancelled if the client goes away); `key_ok(header)`; `models()` -> ids to list."""

    resolve: Callable[[str, str], tuple[str, dict[str, Any]]]
    schema_fields: Callable[[str], frozenset[str]]
    run: Callable[[Request, str, dict[str, Any]], Awaitable[dict[str, Any]]]
    key_ok: Callable[[str | None], bool]
    requires_auth: bool
    models: Callable[[], list[dict[str, Any]]]


def _check_choice(body: dict[str, Any], name: str, allowed: set[str]) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise OpenAIError(400, f"invalid {name} {value!r}; allowed: {', '.join(sorted(allowed))}", param=name,
                          code="invalid_value")


def _int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    try:
        number = int(value)
        if isinstance(value, bool) or (isinstance(value, float) and number != value):
            raise ValueError
    except (TypeError, ValueError):
        raise OpenAIError(400, f"{name} must be an integer", param=name, code="invalid_type") from None
    if not low <= number <= high:
        raise OpenAIError(400, f"{name} must be between {low} and {high}", param=name, code="invalid_value")
    return number


def build_arguments(body: dict[str, Any], fields: frozenset[str], base: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """OpenAI's parameters -> the app's arguments, and the response format ("url" | "b64_json")."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    for name, allowed in (("quality", QUALITIES), ("style", STYLES), ("background", BACKGROUNDS),
                          ("response_format", {"url", "b64_json"}), ("output_format", FORMATS)):
        _check_choice(body, name, allowed)
    arguments: dict[str, Any] = {**base, "prompt": prompt, "num_images": _int(body, "n", 1, 1, MAX_N)}
    size = body.get("size") or "auto"
    if size != "auto":
        match = _SIZE.match(str(size))
        if not match:
            raise OpenAIError(400, f"invalid size {size!r}: WIDTHxHEIGHT or auto", param="size", code="invalid_value")
        arguments["image_size"] = {"width": int(match[1]), "height": int(match[2])}
    fmt = body.get("output_format") or "png"
    arguments["output_format" if "output_format" in fields else "format"] = fmt
    response_format = body.get("response_format") or "url"
    arguments["sync_mode"] = response_format == "b64_json"
    for name in EXTENSIONS:
        if body.get(name) is not None and name in fields:
            arguments[name] = body[name]
    return arguments, response_format


def image_entries(result: dict[str, Any], response_format: str) -> list[dict[str, Any]]:
    images = result.get("images") or ([result["image"]] if result.get("image") else [])
    out = []
    for image in images:
        url = image["url"]
        if response_format == "b64_json":
            out.append({"b64_json": url.split(",", 1)[1] if url.startswith("data:") else url,
                        "revised_prompt": None})
        else:
            out.append({"url": url, "revised_prompt": None})
    return out


def _data_uri(data: bytes, field: str) -> str:
    from ..runtime.files import sniff_extension

    ext = sniff_extension(data[:16])
    if ext is None:
        raise OpenAIError(400, f"{field} is not an image (PNG, JPEG, WEBP, GIF, BMP, TIFF)", param=field,
                          code="invalid_image")
    return f"data:image/{ext};base64,{base64.b64encode(data).decode('ascii')}"


def add_openai_routes(app: FastAPI, config: OpenAIConfig) -> None:
    """Register /v1/images/generations, /v1/images/edits and /v1/models on `app`."""

    def authorize(request: Request) -> None:
        if not config.requires_auth:
            return
        header = request.headers.get("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            header = f"Key {value.strip()}"
        if not config.key_ok(header or None):
            raise OpenAIError(401, "Incorrect API key provided (send `Authorization: Bearer <key>`)",
                              "invalid_request_error", None, "invalid_api_key")

    async def respond(request: Request, body: dict[str, Any], task: str,
                      inputs: dict[str, Any] | None = None) -> JSONResponse:
        model = body.get("model") or DEFAULT_MODEL
        if not isinstance(model, str):
            raise OpenAIError(400, "model must be a string", param="model")
        app_id, base = config.resolve(model, task)
        arguments, response_format = build_arguments(body, config.schema_fields(app_id), {**base, **(inputs or {})})
        result = await config.run(request, app_id, arguments)
        fmt = body.get("output_format") or "png"
        return JSONResponse({"created": int(time.time()), "data": image_entries(result, response_format),
                             "output_format": fmt})

    @app.post("/v1/images/generations", tags=["openai"], summary="OpenAI images API: text to image")
    async def generations(request: Request) -> JSONResponse:
        try:
            authorize(request)
            raw, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_JSON_BYTES:
                    raise OpenAIError(413, f"body larger than {MAX_JSON_BYTES} bytes", code="payload_too_large")
                raw.append(chunk)
            try:
                body = json.loads(b"".join(raw))
            except ValueError:
                raise OpenAIError(400, "the body must be JSON", code="invalid_json") from None
            if not isinstance(body, dict):
                raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
            return await respond(request, body, "generate")
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's shape
            return openai_error(e).response()

    @app.post("/v1/images/edits", tags=["openai"], summary="OpenAI images API: image to image / inpainting")
    async def edits(request: Request) -> JSONResponse:
        try:
            authorize(request)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
                raise OpenAIError(413, f"request larger than {MAX_FORM_BYTES} bytes", code="payload_too_large")
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise OpenAIError(400, "edits take multipart/form-data (image, mask, prompt, ...)",
                                  code="invalid_content_type")
            form = await request.form(max_files=8, max_fields=64)
            body: dict[str, Any] = {}
            files: dict[str, bytes] = {}
            for key, value in form.multi_items():
                name = key.removesuffix("[]")
                if hasattr(value, "read"):
                    if name not in files:  # several images: the first is the one edited
                        data = await value.read(MAX_FORM_BYTES + 1)
                        if len(data) > MAX_FORM_BYTES:
                            raise OpenAIError(413, f"{name} larger than {MAX_FORM_BYTES} bytes", param=name)
                        files[name] = data
                else:
                    body[name] = value
            if "image" not in files:
                raise OpenAIError(400, "image is required", param="image", code="missing_required_parameter")
            inputs = {"image_url": _data_uri(files["image"], "image")}
            if "mask" in files:
                inputs["mask_url"] = _data_uri(files["mask"], "mask")
            if body.get("strength") is not None:
                try:
                    inputs["strength"] = float(body.pop("strength"))
                except ValueError:
                    raise OpenAIError(400, "strength must be a number", param="strength") from None
            for name in ("seed", "num_inference_steps"):
                if body.get(name) is not None:
                    body[name] = _int(body, name, 0, 0, 2**32 - 1)
            if body.get("guidance_scale") is not None:
                body["guidance_scale"] = float(body["guidance_scale"])
            return await respond(request, body, "inpaint" if "mask" in files else "edit", inputs)
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's shape
            return openai_error(e).response()

    @app.get("/v1/models", tags=["openai"], summary="the app ids and models this server runs")
    async def models(request: Request) -> JSONResponse:
        try:
            authorize(request)
            return JSONResponse({"object": "list", "data": config.models()})
        except Exception as e:  # noqa: BLE001
            return openai_error(e).response()
