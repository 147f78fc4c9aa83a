"""fal endpoint schemas: arguments as fal's clients send them -> one engine call -> a fal-shaped result.

Each app id has a pydantic schema with fal's defaults (`image_size` names, steps, guidance), a task, and the model
that serves it (configs/endpoints.yaml, overridable). `prepare()` validates everything that can be validated without
running the model (static ranges, the family's size rules, inputs fetched and decoded), so a bad request is a 422
before it ever waits in the queue; what it returns is a `PreparedCall` whose `execute` runs on the device worker and
whose `render` turns the engine's result into fal's JSON.

No safety checker is configured, and the response says so: `has_nsfw_concepts` holds `null` per image (not a
fabricated `false`) and `safety_checker` explains why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import yaml
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import AppNotFoundError, EndpointUnavailableError, EngineError, InvalidRequestError
from .images import DEFAULT_MAX_PIXELS, load_image_input
from .models.previews import preview_image
from .paths import configs_dir
from .registry import find_spec, registry
from .requests import MAX_SEED, GenerateRequest, invalid_from_validation, parse_request
from .runtime.files import FileStore, data_uri, encode_image
from .sources import is_hub_id, parse_hub_ref

if TYPE_CHECKING:
    from .api import Engine
    from .runtime.queue import JobContext

IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
ImageSizeName = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
ImageFormat = Literal["jpeg", "png"]
SAFETY_NOTE = {"ran": False, "detail": "no safety checker is configured on this server; has_nsfw_concepts is null "
                                        "because nothing was checked"}
MAX_INPUT_BYTES = 32 * 1024 * 1024
INPUT_TIMEOUT_S = 20.0


# -- schemas ----------------------------------------------------------------------------------------------------
class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(default=512, ge=1, le=14142)
    height: int = Field(default=512, ge=1, le=14142)


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class _Input(BaseModel):
    """fal apps ignore arguments they do not know; so do we, and the job log names them."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    prompt: str = Field(max_length=20_000)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=8)
    enable_safety_checker: bool = True
    sync_mode: bool = False

    def image_format(self) -> ImageFormat:
        return getattr(self, "format", None) or getattr(self, "output_format", None) or "jpeg"


class FastSDXLInput(_Input):
    negative_prompt: str = Field(default="", max_length=20_000)
    image_size: ImageSizeName | ImageSize = "square_hd"
    num_inference_steps: int = Field(default=25, ge=1, le=50)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=20.0, allow_inf_nan=False)
    loras: list[LoraWeight] = Field(default_factory=list, max_length=8)
    format: ImageFormat = "jpeg"


class StableDiffusion15Input(FastSDXLInput):
    """As fast-sdxl at SD 1.5's native 512x512; older fal docs pass `width`/`height` directly (they win)."""

    image_size: ImageSizeName | ImageSize = "square"
    width: int | None = Field(default=None, ge=1, le=14142)
    height: int | None = Field(default=None, ge=1, le=14142)


class FastLightningSDXLInput(_Input):
    image_size: ImageSizeName | ImageSize = "square_hd"
    num_inference_steps: Literal["1", "2", "4", "8"] = "4"
    format: ImageFormat = "jpeg"

    @field_validator("num_inference_steps", mode="before")
    @classmethod
    def _steps_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class FluxDevInput(_Input):
    image_size: ImageSizeName | ImageSize = "landscape_4_3"
    num_inference_steps: int = Field(default=28, ge=1, le=50)
    guidance_scale: float = Field(default=3.5, ge=1.0, le=20.0, allow_inf_nan=False)
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: ImageFormat = "jpeg"


class FluxSchnellInput(_Input):
    image_size: ImageSizeName | ImageSize = "landscape_4_3"
    num_inference_steps: int = Field(default=4, ge=1, le=12)
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: ImageFormat = "jpeg"


class LoraInput(FastSDXLInput):
    model_name: str = Field(min_length=1, max_length=4096)
    image_size: ImageSizeName | ImageSize = "square_hd"
    num_inference_steps: int = Field(default=30, ge=1, le=150)
    format: ImageFormat = Field(default="jpeg", validation_alias=AliasChoices("image_format", "format"))


class AuraSRInput(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    image_url: str = Field(min_length=1, max_length=64 * 1024 * 1024)
    upscale_factor: Literal[4] = 4
    upscaling_factor: Literal[4] | None = None  # the older docs' spelling
    overlapping_tiles: bool = False
    checkpoint: Literal["v1", "v2"] = "v1"
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # ours: AuraSR draws noise; fal's schema has no seed
    sync_mode: bool = False


@dataclass(frozen=True)
class EndpointSpec:
    app_id: str
    schema: type[BaseModel]
    task: Literal["text-to-image", "upscale"]
    variant_field: str | None = None  # the argument that picks among several configured models


ENDPOINTS: dict[str, EndpointSpec] = {
    s.app_id: s
    for s in (
        EndpointSpec("fal-ai/fast-sdxl", FastSDXLInput, "text-to-image"),
        EndpointSpec("fal-ai/fast-lightning-sdxl", FastLightningSDXLInput, "text-to-image", "num_inference_steps"),
        EndpointSpec("fal-ai/stable-diffusion-v1-5", StableDiffusion15Input, "text-to-image"),
        EndpointSpec("fal-ai/flux/dev", FluxDevInput, "text-to-image"),
        EndpointSpec("fal-ai/flux/schnell", FluxSchnellInput, "text-to-image"),
        EndpointSpec("fal-ai/lora", LoraInput, "text-to-image"),
        EndpointSpec("fal-ai/aura-sr", AuraSRInput, "upscale", "checkpoint"),
    )
}


# -- app id -> model ---------------------------------------------------------------------------------------------
ModelChoice = str | dict[str, str] | None


class EndpointTable:
    """Which model serves each app id: configs/endpoints.yaml, then overrides (an override pins every variant)."""

    def __init__(self, overrides: Mapping[str, str] | None = None, config: Mapping[str, ModelChoice] | None = None):
        if config is None:
            with open(configs_dir() / "endpoints.yaml", encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        unknown = sorted(set(config) - set(ENDPOINTS))
        if unknown:
            raise ValueError(f"endpoints.yaml: unknown app ids {unknown}; known: {sorted(ENDPOINTS)}")
        self._models: dict[str, ModelChoice] = {app: config.get(app) for app in ENDPOINTS}
        for app, model in (overrides or {}).items():
            self.set_model(app, model)

    def set_model(self, app_id: str, model: str) -> None:
        self.spec(app_id)
        if not model:
            raise ValueError(f"{app_id}: empty model")
        self._models[app_id] = model

    def spec(self, app_id: str) -> EndpointSpec:
        spec = ENDPOINTS.get(app_id.strip("/"))
        if spec is None:
            raise AppNotFoundError(f"no app {app_id!r} on this server; known: {', '.join(sorted(ENDPOINTS))}")
        return spec

    def model_for(self, app_id: str, variant: str | None = None) -> str | None:
        choice = self._models[self.spec(app_id).app_id]
        if isinstance(choice, dict):
            return choice.get(str(variant), next(iter(choice.values()), None))
        return choice

    def as_dict(self) -> dict[str, ModelChoice]:
        return dict(self._models)


def parse_override(text: str) -> tuple[str, str]:
    """`APP_ID=MODEL` as given to `engine serve --endpoint`."""
    app, sep, model = text.partition("=")
    if not sep or not app or not model:
        raise ValueError(f"--endpoint wants APP_ID=MODEL, got {text!r}")
    return app.strip().strip("/"), model.strip()


# -- prepared calls ----------------------------------------------------------------------------------------------
Render = Callable[[Any, FileStore, "str | None"], dict[str, Any]]


@dataclass
class PreparedCall:
    """A validated request: `execute(engine, ctx)` runs on the device worker, `render` makes the fal JSON."""

    app_id: str
    model: str
    execute: Callable[["Engine", "JobContext"], Any]
    render: Render
    notes: list[str] = field(default_factory=list)


def prepare(app_id: str, arguments: Any, *, engine: "Engine", table: EndpointTable, trusted: bool,
            allow_private_urls: bool = False) -> PreparedCall:
    """Validate `arguments` for `app_id` and bind them to the engine. `trusted`: the caller may name local paths
    (the in-process API); HTTP clients may not."""
    spec = table.spec(app_id)
    if not isinstance(arguments, dict):
        raise InvalidRequestError("body", "the arguments must be a JSON object")
    try:
        args = spec.schema.model_validate(arguments)
    except ValidationError as e:
        raise invalid_from_validation(e, spec.schema) from None
    notes = [f"ignored unknown arguments: {', '.join(sorted(args.model_extra))}"] if args.model_extra else []
    if args.model_extra:  # ignored means never read: what follows reads fields by name, and extras answer to names
        args = spec.schema.model_validate({k: v for k, v in arguments.items() if k not in args.model_extra})
    if spec.task == "upscale":
        call = _prepare_upscale(spec, args, engine, table, allow_private_urls, trusted)  # type: ignore[arg-type]
    else:
        call = _prepare_text_to_image(spec, args, table, trusted)  # type: ignore[arg-type]
    call.notes[:0] = notes
    return call


def _size(args: _Input) -> tuple[int, int]:
    if getattr(args, "width", None) is not None or getattr(args, "height", None) is not None:
        base = _size_of(args.image_size)  # type: ignore[attr-defined]
        return args.width or base[0], args.height or base[1]  # type: ignore[attr-defined]
    return _size_of(args.image_size)  # type: ignore[attr-defined]


def _size_of(value: str | ImageSize) -> tuple[int, int]:
    return IMAGE_SIZES[value] if isinstance(value, str) else (value.width, value.height)


def _model_for_request(spec: EndpointSpec, args: BaseModel, table: EndpointTable,
                       trusted: bool) -> tuple[str, list[str]]:
    pinned = table.model_for(spec.app_id, getattr(args, spec.variant_field) if spec.variant_field else None)
    name = getattr(args, "model_name", None)
    if name is None:
        if not pinned:
            raise EndpointUnavailableError(f"{spec.app_id}: no model configured (use --endpoint {spec.app_id}=MODEL)")
        if find_spec(pinned) is None and not is_hub_id(pinned) and not os.path.exists(pinned):
            raise EndpointUnavailableError(f"{spec.app_id} is mapped to {pinned!r}, which is not a registered model; "
                                           f"map it with --endpoint {spec.app_id}=MODEL")
        return pinned, []
    if pinned:
        return pinned, [f"model_name {name!r} ignored: this server pins {spec.app_id} to {pinned!r}"]
    if find_spec(name) is not None:
        return name, []
    by_source = next((s.id for s in registry().values() if s.source == name), None)
    if by_source is not None:
        return by_source, []
    if trusted or is_hub_id(name):
        return name, []
    raise InvalidRequestError("model_name", "must be a registry id or a hub repository id (owner/name)",
                              "ids from `engine models`, owner/name")


def _lora_list(args: BaseModel, trusted: bool) -> list[dict[str, Any]]:
    loras: list[LoraWeight] = getattr(args, "loras", [])
    if not loras:
        return []
    for i, lora in enumerate(loras):
        remote = lora.path.startswith(("http://", "https://")) or parse_hub_ref(lora.path) is not None
        if not trusted and (not remote or ".." in lora.path):
            raise InvalidRequestError(f"loras.{i}.path", "must be an http(s) URL or a hub id", "URL, owner/name[/file]")
    return [lora.model_dump() for lora in loras]


def _prepare_text_to_image(spec: EndpointSpec, args: _Input, table: EndpointTable, trusted: bool) -> PreparedCall:
    model, notes = _model_for_request(spec, args, table, trusted)
    width, height = _size(args)
    fields: dict[str, Any] = {
        "model": model, "prompt": args.prompt, "width": width, "height": height,
        "num_inference_steps": int(args.num_inference_steps),  # type: ignore[attr-defined]
        "num_images": args.num_images, "seed": args.seed,
    }
    if getattr(args, "negative_prompt", None) is not None:
        # fal's default "" is kept: SDXL encodes "" (as diffusers does) where None would zero the negative branch.
        fields["negative_prompt"] = args.negative_prompt  # type: ignore[attr-defined]
    if getattr(args, "guidance_scale", None) is not None:
        fields["guidance_scale"] = args.guidance_scale  # type: ignore[attr-defined]
    loras = _lora_list(args, trusted)
    if loras:
        fields["loras"] = loras
    size_field = "width" if getattr(args, "width", None) is not None else "image_size.width"
    renames = {"width": size_field, "height": size_field.replace("width", "height")}
    try:
        request: GenerateRequest = parse_request(GenerateRequest, fields)
        model_spec = find_spec(model)
        if model_spec is not None and model_spec.family_spec.task == "text-to-image":
            request.validate_for_family(model_spec.family_spec, width, height)
    except InvalidRequestError as e:
        raise _renamed(e, renames) from None
    if model_spec is not None and model_spec.family_spec.task != "text-to-image":
        raise EndpointUnavailableError(f"{spec.app_id} is mapped to {model!r}, which is not a text-to-image model")
    fmt, sync_mode = args.image_format(), args.sync_mode
    notes.append("safety checker: none configured; images were not checked"
                 if args.enable_safety_checker else "safety checker: disabled by the request")

    def execute(engine: "Engine", ctx: "JobContext") -> Any:
        family = model_spec.family if model_spec is not None else engine.load(model).family.name

        def on_step(i: int, n: int, latents: Any) -> None:
            ctx.progress(i + 1, n, preview=lambda: _preview_object(latents, family, width, height))

        return engine.generate(request, step_callback=on_step)

    def render(result: Any, store: FileStore, base_url: str | None) -> dict[str, Any]:
        images = [store.image_object(im, fmt, sync_mode=sync_mode, base_url=base_url) for im in result.images]
        return {
            "images": images,
            "timings": {"inference": result.timings.get("total", 0.0), **result.timings},
            "seed": result.seed,
            "has_nsfw_concepts": [None] * len(images),
            "safety_checker": dict(SAFETY_NOTE),
            "prompt": result.prompt,
        }

    return PreparedCall(spec.app_id, model, execute, render, notes)


def _preview_object(latents: Any, family: str, width: int, height: int) -> dict[str, Any]:
    image = preview_image(latents, family, width, height)
    return {"url": data_uri(encode_image(image, "jpeg", quality=70), "image/jpeg"), "content_type": "image/jpeg",
            "width": image.width, "height": image.height}


def _renamed(e: InvalidRequestError, renames: Mapping[str, str]) -> InvalidRequestError:
    """An engine-side field error re-addressed to the fal schema's field (width -> image_size.width)."""
    name = renames.get(e.field)
    if name is None:
        return e
    message = str(e).split(": ", 1)[1].split(" (allowed: ")[0]
    return InvalidRequestError(name, message, e.allowed, e.value)


def _prepare_upscale(spec: EndpointSpec, args: AuraSRInput, engine: "Engine", table: EndpointTable,
                     allow_private_urls: bool, trusted: bool) -> PreparedCall:
    model = table.model_for(spec.app_id, args.checkpoint)  # spec.variant_field
    if not model:
        raise EndpointUnavailableError(f"{spec.app_id}: no model configured for checkpoint {args.checkpoint!r}")
    image = load_image_argument(args.image_url, allow_private_urls=allow_private_urls, trusted=trusted)
    overlapping, seed, sync_mode = args.overlapping_tiles, args.seed, args.sync_mode

    def execute(engine: "Engine", ctx: "JobContext") -> Any:
        ctx.log(f"upscaling {image.width}x{image.height} x4 with {model}")
        return engine.upscale(image=image, model=model, upscale_factor=4, overlapping_tiles=overlapping, seed=seed)

    def render(result: Any, store: FileStore, base_url: str | None) -> dict[str, Any]:
        timings = dict(getattr(result, "timings", {}) or {})
        out = {"image": store.image_object(result.image, "png", sync_mode=sync_mode, base_url=base_url),
               "timings": {"inference": timings.get("total", sum(timings.values())), **timings}}
        if getattr(result, "seed", None) is not None:
            out["seed"] = result.seed
        return out

    return PreparedCall(spec.app_id, model, execute, render, [])


# -- image inputs ------------------------------------------------------------------------------------------------
def load_image_argument(value: str, *, allow_private_urls: bool, trusted: bool = False,
                        field_name: str = "image_url") -> Image.Image:
    """A data URI or http(s) URL (and, for `trusted` callers only, a local path) as a PIL image, through
    `engine.images` (the one SSRF guard, engine/net.py, fetches URLs). Every refusal is an `InvalidRequestError` on
    `field_name` (422)."""
    try:
        return load_image_input(value, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=MAX_INPUT_BYTES,
                                allow_private_urls=allow_private_urls, timeout_s=INPUT_TIMEOUT_S,
                                allow_local_paths=trusted, field=field_name)
    except InvalidRequestError as e:
        if e.field == field_name:
            raise
        raise InvalidRequestError(field_name, str(e), e.allowed) from None
    except EngineError:
        raise
    except (ValueError, OSError) as e:
        raise InvalidRequestError(field_name, str(e)) from None
