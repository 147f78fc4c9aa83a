"""Typed requests and results of the Python API. Static ranges are checked by pydantic; the checks that depend on
the model (size multiple and range of its family, FLUX-only fields) by `validate_for_family`. Either way the caller
gets an `InvalidRequestError` naming the field and the allowed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequestError
from .families import FamilySpec
MAX_SEED = 2**63 - 1
MAX_LORAS = 4


class LoraSpec(BaseModel):
    """One adapter of a request: `path` is a local .safetensors file, an http(s) URL, or a hub id (owner/repo or
    owner/repo/file.safetensors). Resolved (fetched, hashed) by engine/lora.py."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


MAX_CONTROLNETS = 4


class ControlNetSpec(BaseModel):
    """One ControlNet of a job. `model`: a registry id, folder or hub id (resolved for the model's family), or from
    trusted Python callers a loaded ControlNet module. `image`: any form `load_image_input` takes; it is resized to
    the output size as diffusers does. `start`/`end`: the fraction of the steps it acts on (diffusers'
    `control_guidance_start`/`control_guidance_end`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    model: Any
    image: Any
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _start_before_end(self) -> "ControlNetSpec":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        if isinstance(self.model, str) and not 0 < len(self.model) <= 4096:
            raise ValueError("model must be a non-empty id or path of at most 4096 characters")
        return self


class IPAdapterSpec(BaseModel):
    """An image prompt (SD 1.5, SDXL): `model` is a registered IP-Adapter id, or (trusted callers) a local
    `<folder>/<subfolder>/<weights>.safetensors` or hub id, resolved for the model's family by
    engine/loading/ip_adapter.py; `image` takes the forms `load_image_input` takes; `scale` weighs the image tokens
    against the text (diffusers' `set_ip_adapter_scale`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    model: str = Field(min_length=1, max_length=4096)
    image: Any
    scale: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)


class GenerateRequest(BaseModel):
    """Generation arguments. Fields left as None take the model's defaults (registry).

    Image-conditioned modes: `image` (+ `strength`) is image-to-image; with `mask_image` (white = repaint)
    inpainting; `controlnets` add ControlNets to any mode; `ip_adapter` adds an image prompt (SD 1.5, SDXL).
    Images take the forms `load_image_input` takes; the
    output follows `image` (or the first ControlNet image), rounded down to the family's size multiple, unless
    width/height are given."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, max_length=4096)
    prompt: str = Field(max_length=20_000)
    negative_prompt: str | None = Field(default=None, max_length=20_000)
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)
    num_inference_steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    num_images: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    max_sequence_length: int | None = Field(default=None, ge=1, le=512)
    true_cfg_scale: float = Field(default=1.0, ge=1.0, le=100.0, allow_inf_nan=False)
    scheduler: str | None = Field(default=None, max_length=64)  # a preset name (engine.schedulers); None: the model's
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS)
    image: Any = None
    strength: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)  # None: diffusers' default
    mask_image: Any = None
    controlnets: list[ControlNetSpec] = Field(default_factory=list, max_length=MAX_CONTROLNETS)
    ip_adapter: IPAdapterSpec | None = None

    @classmethod
    def build(cls, **kwargs: Any) -> "GenerateRequest":
        return parse_request(cls, kwargs)

    def validate_for_family(self, family: FamilySpec, width: int, height: int) -> None:
        m = family.size_multiple
        allowed = f"multiples of {m} from {family.min_size} to {family.max_size}"
        for name, value in (("width", width), ("height", height)):
            if value % m != 0:
                raise InvalidRequestError(name, f"{value} is not a multiple of {m} for {family.name}", allowed, value)
            if not family.min_size <= value <= family.max_size:
                raise InvalidRequestError(name, f"{value} is out of range for {family.name}", allowed, value)
        if family.name != "flux":
            for name in ("max_sequence_length",):
                if getattr(self, name) is not None:
                    raise InvalidRequestError(name, f"only applies to FLUX models, not {family.name}")
            if self.true_cfg_scale != 1.0:
                raise InvalidRequestError("true_cfg_scale", f"only applies to FLUX models; use guidance_scale for {family.name}")
        if self.mask_image is not None and self.image is None:
            raise InvalidRequestError("image", "mask_image needs the image to inpaint")
        if self.strength is not None and self.image is None:
            raise InvalidRequestError("strength", "only applies with an image (image-to-image or inpainting)")


def _field_range(cls: type[BaseModel], name: str) -> str | None:
    """The declared bounds of a field as "lo..hi" (or one side), for error messages."""
    info = cls.model_fields.get(name)
    if info is None:
        return None
    lo = hi = None
    for m in info.metadata:
        lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
        if getattr(m, "max_length", None) is not None:
            return f"at most {m.max_length} characters"
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return None


def invalid_from_validation(exc: ValidationError, cls: type[BaseModel] | None = None) -> InvalidRequestError:
    """The first field error as an InvalidRequestError (all of them listed in the message)."""
    errors = exc.errors()
    first = errors[0]
    name = ".".join(str(p) for p in first["loc"]) or "request"
    message = first["msg"]
    if len(errors) > 1:
        others = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[1:])
        message += f" (also: {others})"
    allowed = _field_range(cls, str(first["loc"][0])) if cls is not None and first["loc"] else None
    err = InvalidRequestError(name, message, allowed, first.get("input"))
    err.errors = errors  # type: ignore[attr-defined]
    return err


def parse_request(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise invalid_from_validation(e, cls) from None


class UpscaleRequest(BaseModel):
    """Upscale arguments. `image`: PIL image, numpy array, path, http(s) URL or data URI."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    image: Any
    model: str = Field(default="aura-sr", min_length=1, max_length=4096)
    upscale_factor: Literal[4] = 4
    overlapping_tiles: bool = False
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    shared_style: bool = False  # one style for all tiles: static convolutions, faster; not the reference's draws


@dataclass
class UpscaleResult:
    image: Image.Image
    seed: int
    timings: dict[str, float]
    model: str
    tiles: int = 0


@dataclass
class Result:
    """Images with the seed that made them and per-stage timings in seconds (encode, denoise, decode, total)."""

    images: list[Image.Image]
    seed: int
    timings: dict[str, float]
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)
