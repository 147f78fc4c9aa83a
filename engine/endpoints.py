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
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import yaml
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import AppNotFoundError, EndpointUnavailableError, EngineError, InvalidRequestError
from .images import DEFAULT_MAX_PIXELS, load_image_input
from .models.previews import preview_image
from .families import FamilySpec
from .paths import configs_dir
from .registry import adjuncts, find_adjunct, find_spec, registry
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


# Image-conditioned apps. `image_size` left out: the output takes the input image's size, rounded down to the
# family's multiple (fal infers it from the image too); given, the image is resized to it.
def _image_url_field() -> Any:
    return Field(min_length=1, max_length=64 * 1024 * 1024)


class FastSDXLImageToImageInput(FastSDXLInput):
    image_url: str = _image_url_field()
    image_size: ImageSizeName | ImageSize | None = None
    strength: float = Field(default=0.95, ge=0.05, le=1.0, allow_inf_nan=False)


class FastSDXLInpaintingInput(FastSDXLImageToImageInput):
    """`mask_url`: white is repainted, black kept; it must have the image's size."""

    mask_url: str = _image_url_field()


class FluxDevImageToImageInput(FluxDevInput):
    image_url: str = _image_url_field()
    image_size: ImageSizeName | ImageSize | None = None
    num_inference_steps: int = Field(default=40, ge=1, le=50)
    strength: float = Field(default=0.95, ge=0.01, le=1.0, allow_inf_nan=False)


class FalControlNet(BaseModel):
    """One of flux-general's `controlnets`: `path` is a registered ControlNet id or a hub repository (trusted callers:
    a folder too); `control_image_url` (older docs: `image_url`) the control image. The fal fields this engine does
    not implement are refused when given, never dropped."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)
    path: str = Field(min_length=1, max_length=4096)
    control_image_url: str = Field(min_length=1, max_length=64 * 1024 * 1024,
                                   validation_alias=AliasChoices("control_image_url", "image_url"))
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    start_percentage: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    end_percentage: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    mask_image_url: str | None = None
    mask_threshold: float | None = None
    config_url: str | None = None
    variant: str | None = None


class FalIPAdapter(BaseModel):
    """One of flux-general's `ip_adapters`: `path` (+ `subfolder`, `weight_name`) names a registered IP-Adapter, which
    brings its own image encoder."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    path: str = Field(min_length=1, max_length=4096)
    image_url: str = _image_url_field()
    scale: float = Field(ge=0.0, le=2.0, allow_inf_nan=False)
    subfolder: str | None = None
    weight_name: str | None = None
    image_encoder_path: str | None = None
    image_encoder_subfolder: str | None = None
    image_encoder_weight_name: str | None = None
    mask_image_url: str | None = None
    mask_threshold: float | None = None


class FluxGeneralInput(FluxDevInput):
    """FLUX.1 [dev] with ControlNets and IP-Adapters. `negative_prompt` runs as true CFG with `real_cfg_scale` when
    `use_real_cfg`; fal's default for it (NAG) is not implemented, so a negative prompt without it is refused."""

    output_format: ImageFormat = "png"
    controlnets: list[FalControlNet] = Field(default_factory=list, max_length=4)
    ip_adapters: list[FalIPAdapter] = Field(default_factory=list, max_length=1)
    negative_prompt: str = Field(default="", max_length=20_000)
    use_real_cfg: bool = False
    real_cfg_scale: float = Field(default=3.5, ge=1.0, le=20.0, allow_inf_nan=False)


class CreativeUpscalerInput(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    image_url: str = _image_url_field()
    model_type: Literal["SD_1_5", "SDXL"] = "SD_1_5"
    prompt: str = Field(default="", max_length=20_000)
    prompt_suffix: str = Field(default=" high quality, highly detailed, high resolution, sharp", max_length=2_000)
    negative_prompt: str = Field(default="blurry, low resolution, bad, ugly, low quality, pixelated, interpolated, "
                                         "compression artifacts, noisey, grainy", max_length=20_000)
    scale: float = Field(default=2.0, ge=1.0, le=5.0, allow_inf_nan=False)
    creativity: float = Field(default=0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    detail: float = Field(default=1.0, ge=0.0, le=5.0, allow_inf_nan=False)
    shape_preservation: float = Field(default=0.25, ge=0.0, le=3.0, allow_inf_nan=False)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=16.0, allow_inf_nan=False)
    num_inference_steps: int = Field(default=20, ge=1, le=200)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    enable_safety_checks: bool = True
    sync_mode: bool = False


@dataclass(frozen=True)
class EndpointSpec:
    app_id: str
    schema: type[BaseModel]
    task: Literal["text-to-image", "upscale", "creative-upscale"]  # image-conditioned apps are text-to-image + inputs
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
        EndpointSpec("fal-ai/fast-sdxl/image-to-image", FastSDXLImageToImageInput, "text-to-image"),
        EndpointSpec("fal-ai/fast-sdxl/inpainting", FastSDXLInpaintingInput, "text-to-image"),
        EndpointSpec("fal-ai/flux/dev/image-to-image", FluxDevImageToImageInput, "text-to-image"),
        EndpointSpec("fal-ai/flux-general", FluxGeneralInput, "text-to-image"),
        EndpointSpec("fal-ai/creative-upscaler", CreativeUpscalerInput, "creative-upscale", "model_type"),
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
    elif spec.task == "creative-upscale":
        call = _prepare_creative_upscale(spec, args, table, allow_private_urls, trusted)  # type: ignore[arg-type]
    else:
        call = _prepare_text_to_image(spec, args, table, trusted, allow_private_urls)  # type: ignore[arg-type]

    call.notes[:0] = notes
    return call


def _size(args: _Input, image: Image.Image | None = None, family: FamilySpec | None = None) -> tuple[int, int]:
    if getattr(args, "width", None) is not None or getattr(args, "height", None) is not None:
        base = _size_of(args.image_size)  # type: ignore[attr-defined]
        return args.width or base[0], args.height or base[1]  # type: ignore[attr-defined]
    if getattr(args, "image_size", None) is None and image is not None:  # image-conditioned: the image's size
        m = family.size_multiple if family is not None else 8
        return max(m, image.width // m * m), max(m, image.height // m * m)
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


def _prepare_text_to_image(spec: EndpointSpec, args: _Input, table: EndpointTable, trusted: bool,
                           allow_private_urls: bool = False) -> PreparedCall:
    model, notes = _model_for_request(spec, args, table, trusted)
    model_spec = find_spec(model)
    family = model_spec.family_spec if model_spec is not None else None
    conditioning = _conditioning_fields(args, family, trusted, allow_private_urls)
    if model_spec is not None and model_spec.variant == "inpaint" and "mask_image" not in conditioning:
        raise EndpointUnavailableError(f"{spec.app_id} is mapped to {model!r}, an inpainting model: it needs an "
                                       "image and a mask (fal-ai/fast-sdxl/inpainting)")
    width, height = _size(args, conditioning.get("image"), family)
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
    if getattr(args, "use_real_cfg", None) is not None:  # flux-general: a negative prompt is true CFG here
        if args.use_real_cfg:  # type: ignore[attr-defined]
            fields["true_cfg_scale"] = args.real_cfg_scale  # type: ignore[attr-defined]
        elif args.negative_prompt:  # type: ignore[attr-defined]
            raise InvalidRequestError("negative_prompt", "without use_real_cfg fal applies it by NAG, which this "
                                      "engine does not implement; set use_real_cfg (true CFG, real_cfg_scale)")
        else:
            fields.pop("negative_prompt", None)
    loras = _lora_list(args, trusted)
    if loras:
        fields["loras"] = loras
    fields.update(conditioning)
    size_field = "width" if getattr(args, "width", None) is not None else "image_size.width"
    if getattr(args, "image_size", "") is None:
        size_field = "image_url"  # the size comes from the image
    renames = {"width": size_field, "height": size_field.replace("width", "height"), **_CONDITIONING_RENAMES}
    try:
        request: GenerateRequest = parse_request(GenerateRequest, fields)
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

        try:
            return engine.generate(request, step_callback=on_step)
        except InvalidRequestError as e:  # checks that need the loaded model (a ControlNet folder's family, ...)
            raise _renamed(e, renames) from None

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
    """An engine-side field error re-addressed to the fal schema's field (width -> image_size.width,
    controlnets[1].image -> controlnets.1.control_image_url)."""
    indexed = _INDEXED.fullmatch(e.field)
    name = renames.get(e.field)
    if name is None and indexed is not None:
        key = f"{indexed['list']}[].{indexed['attr']}" if indexed["attr"] else f"{indexed['list']}[]"
        template = renames.get(key)
        name = template.format(i=indexed["i"]) if template is not None else None
    if name is None:
        return e
    message = str(e).split(": ", 1)[1].split(" (allowed: ")[0]
    return InvalidRequestError(name, message, e.allowed, e.value)


# Engine field -> fal field, for errors raised while the request is built or run ("[]": any index).
_CONDITIONING_RENAMES = {
    "image": "image_url", "mask_image": "mask_url",
    "controlnets[].model": "controlnets.{i}.path", "controlnets[].image": "controlnets.{i}.control_image_url",
    "controlnets[].conditioning_scale": "controlnets.{i}.conditioning_scale",
    "controlnets[].start": "controlnets.{i}.start_percentage", "controlnets[].end": "controlnets.{i}.end_percentage",
    "controlnets[]": "controlnets.{i}", "controlnets": "controlnets",
    "ip_adapter.model": "ip_adapters.0.path", "ip_adapter.image": "ip_adapters.0.image_url",
    "ip_adapter.scale": "ip_adapters.0.scale", "ip_adapter": "ip_adapters",
}
_INDEXED = re.compile(r"(?P<list>\w+)(?:\[|\.)(?P<i>\d+)\]?(?:\.(?P<attr>\w+))?")



def _conditioning_fields(args: BaseModel, family: FamilySpec | None, trusted: bool,
                         allow_private_urls: bool) -> dict[str, Any]:
    """The image-conditioned GenerateRequest fields of a fal request (image, strength, mask_image, controlnets,
    ip_adapter), every image fetched and decoded now, so a bad input is a 422 naming the fal field before the job is
    queued. Schemas without such fields give {}."""
    def image(value: str, field_name: str, mode: str) -> Image.Image:
        return load_image_argument(value, allow_private_urls=allow_private_urls, trusted=trusted,
                                   field_name=field_name).convert(mode)

    out: dict[str, Any] = {}
    if getattr(args, "image_url", None) is not None:
        out["image"] = image(args.image_url, "image_url", "RGB")  # type: ignore[attr-defined]
        out["strength"] = args.strength  # type: ignore[attr-defined]
    if getattr(args, "mask_url", None) is not None:
        mask = image(args.mask_url, "mask_url", "L")  # type: ignore[attr-defined]
        if mask.size != out["image"].size:
            raise InvalidRequestError("mask_url", f"the mask is {mask.width}x{mask.height} and the image "
                                      f"{out['image'].width}x{out['image'].height}; they must be the same size")
        out["mask_image"] = mask
    controlnets = []
    for i, cn in enumerate(getattr(args, "controlnets", None) or []):
        _refuse_unimplemented(cn, ("mask_image_url", "mask_threshold", "config_url", "variant"), f"controlnets.{i}")
        if cn.start_percentage >= cn.end_percentage:
            raise InvalidRequestError(f"controlnets.{i}.end_percentage", f"must be above start_percentage "
                                      f"({cn.start_percentage})", "start_percentage < end_percentage <= 1")
        _check_adjunct_name(cn.path, "controlnet", family, trusted, f"controlnets.{i}.path")
        controlnets.append({"model": cn.path, "conditioning_scale": cn.conditioning_scale,
                            "image": image(cn.control_image_url, f"controlnets.{i}.control_image_url", "RGB"),
                            "start": cn.start_percentage, "end": cn.end_percentage})
    if controlnets:
        out["controlnets"] = controlnets
    for i, ip in enumerate(getattr(args, "ip_adapters", None) or []):
        _refuse_unimplemented(ip, ("image_encoder_path", "image_encoder_subfolder", "image_encoder_weight_name",
                                   "mask_image_url", "mask_threshold"), f"ip_adapters.{i}")
        adapter = _ip_adapter_id(ip, f"ip_adapters.{i}.path")
        _check_adjunct_name(adapter, "ip_adapter", family, trusted, f"ip_adapters.{i}.path")
        if "ip_adapter" not in GenerateRequest.model_fields:
            raise InvalidRequestError(f"ip_adapters.{i}.path", "IP-Adapters are not supported by this engine build")
        out["ip_adapter"] = {"model": adapter, "image": image(ip.image_url, f"ip_adapters.{i}.image_url", "RGB"),
                             "scale": ip.scale}
    return out


def _refuse_unimplemented(entry: BaseModel, names: tuple[str, ...], prefix: str) -> None:
    for name in names:
        if getattr(entry, name) is not None:
            raise InvalidRequestError(f"{prefix}.{name}", "is not supported by this engine; leave it out")


def _ip_adapter_id(ip: "FalIPAdapter", field_name: str) -> str:
    """fal names an adapter by repository + subfolder + weight name: the registry entry with that layout (or a
    registry id given as `path`)."""
    if find_adjunct("ip_adapter", ip.path) is not None:
        return ip.path
    for spec in adjuncts("ip_adapter").values():
        if spec.source == ip.path and ip.subfolder in (None, spec.subfolder) and \
                ip.weight_name in (None, spec.weight_name):
            return spec.id
    raise InvalidRequestError(field_name, f"no registered IP-Adapter is {ip.path} {ip.subfolder or ''}/"
                              f"{ip.weight_name or ''}", ", ".join(sorted(adjuncts("ip_adapter"))))


def _check_adjunct_name(name: str, kind: str, family: FamilySpec | None, trusted: bool, field_name: str) -> None:
    """What the name alone tells, before queueing: a registered adjunct of another family, or a name an untrusted
    caller may not use (a local path). Folders and hub repositories are checked again when they are loaded."""
    from .loading.adjuncts import find_adjunct_spec

    spec = find_adjunct_spec(kind, name)
    if spec is not None and family is not None and spec.family != family.name:
        raise InvalidRequestError(field_name, f"{name!r} is for {spec.family} models; this endpoint's model is "
                                  f"{family.name}", value=name)
    if spec is None and not trusted and not is_hub_id(name):
        raise InvalidRequestError(field_name, "must be a registered id or a hub repository id (owner/name)",
                                  ", ".join(sorted(adjuncts(kind))))


def _prepare_creative_upscale(spec: EndpointSpec, args: "CreativeUpscalerInput", table: EndpointTable,
                              allow_private_urls: bool, trusted: bool) -> PreparedCall:
    """fal's creative-upscaler: enlarge by `scale`, redraw tile by tile (engine/pipelines/creative_upscale.py)."""
    from .pipelines.creative_upscale import CreativeUpscaleConfig, creative_upscale, target_size

    model = table.model_for(spec.app_id, args.model_type)
    if not model:
        raise EndpointUnavailableError(f"{spec.app_id}: no model configured for model_type {args.model_type!r}")
    model_spec = find_spec(model)
    if model_spec is None or model_spec.family not in ("sd15", "sdxl") or model_spec.variant:
        raise EndpointUnavailableError(f"{spec.app_id} is mapped to {model!r}; it needs a registered SD 1.5 or SDXL "
                                       "model")
    image = load_image_argument(args.image_url, allow_private_urls=allow_private_urls, trusted=trusted)
    target_size(image, args.scale, model_spec.family_spec.size_multiple)  # a 422 on `scale` now, not in the job
    config = CreativeUpscaleConfig(
        model=model, prompt=args.prompt, prompt_suffix=args.prompt_suffix, negative_prompt=args.negative_prompt,
        scale=args.scale, creativity=args.creativity, detail=args.detail, shape_preservation=args.shape_preservation,
        guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps, seed=args.seed)
    sync_mode = args.sync_mode
    notes = ["safety checker: none configured; images were not checked"]

    def execute(engine: "Engine", ctx: "JobContext") -> Any:
        ctx.log(f"creative upscale {image.width}x{image.height} x{args.scale} with {model}")
        return creative_upscale(engine, image, config, on_tile=lambda i, n: ctx.log(f"tile {i}/{n}"))

    def render(result: Any, store: FileStore, base_url: str | None) -> dict[str, Any]:
        return {"image": store.image_object(result.image, "png", sync_mode=sync_mode, base_url=base_url),
                "seed": result.seed, "timings": {"inference": result.timings.get("total", 0.0), **result.timings}}

    return PreparedCall(spec.app_id, model, execute, render, notes)


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
