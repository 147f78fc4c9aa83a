"""The model registry: a table of typed `ModelSpec`s read from configs/models.yaml. Data only: whether a model's
weights are on this machine is the loaders' question (`engine.loading.available_offline`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelNotFoundError
from .families import FamilySpec, get_family
from .paths import configs_dir


@dataclass(frozen=True)
class ModelDefaults:
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    max_sequence_length: int | None = None  # FLUX: T5 tokens
    upscale_factor: int | None = None  # upscalers
    scheduler: str | None = None  # scheduler preset (engine.schedulers) the model was distilled for


MODEL_KINDS = ("model", "controlnet", "ip_adapter")  # "model": a whole pipeline; the others plug into one


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str
    source: str  # hub repository id, or "tiny:<name>" for an offline seeded build
    defaults: ModelDefaults
    description: str = ""
    arch: str | None = None  # configs/arch/<arch>/ for offline single-file loading
    endpoints: tuple[str, ...] = field(default_factory=tuple)
    # Distilled presets: a base model with a replacement UNet and/or a LoRA fused in, loaded as one id.
    base: str | None = None  # registry id of the base model
    unet: str | None = None  # diffusers-format UNet weights: hub "owner/repo/file.safetensors" or a local file
    lora: str | None = None  # LoRA fused into the base: hub "owner/repo/file.safetensors" or a local file
    lora_scale: float = 1.0
    # What the entry is: a whole model, or an adjunct (ControlNet, IP-Adapter) that plugs into a model of `family`.
    kind: str = "model"
    variant: str = ""  # "inpaint": a denoiser that also takes the masked image and mask (FamilySpec.variant_pipelines)
    # IP-Adapters (diffusers `load_ip_adapter`): the weights file in `subfolder` of `source`, and the image encoder's
    # folder (a name inside `subfolder`, or a path from the repository root when it holds a "/").
    subfolder: str | None = None
    weight_name: str | None = None
    image_encoder_folder: str | None = None
    tile_controlnet: str | None = None  # registry id of the tile ControlNet this model pairs with (creative upscale)

    @property
    def family_spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def is_preset(self) -> bool:
        return self.base is not None

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith("tiny:")

    @property
    def tiny_config(self) -> str | None:
        return self.source.split(":", 1)[1] if self.is_tiny else None


def _parse(model_id: str, raw: dict[str, Any]) -> ModelSpec:
    defaults = ModelDefaults(**raw.get("defaults", {}))
    family = get_family(raw["family"])  # validate early: a typo in the table fails at load, not at request time
    kind = raw.get("kind", "model")
    if kind not in MODEL_KINDS:
        raise ValueError(f"models.yaml: {model_id} has kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    if raw.get("variant"):
        family.variant_pipeline(raw["variant"])
    if kind == "ip_adapter" and not (raw.get("subfolder") is not None and raw.get("weight_name")):
        raise ValueError(f"models.yaml: IP-Adapter {model_id} needs subfolder and weight_name")
    if kind == "model" and family.task == "text-to-image":
        missing = [k for k in ("steps", "guidance_scale", "width", "height") if getattr(defaults, k) is None]
        if missing:
            raise ValueError(f"models.yaml: {model_id} lacks defaults {missing}")
    return ModelSpec(
        id=model_id,
        family=raw["family"],
        source=raw["source"],
        defaults=defaults,
        description=raw.get("description", ""),
        arch=raw.get("arch"),
        endpoints=tuple(raw.get("endpoints", ())),
        base=raw.get("base"),
        unet=raw.get("unet"),
        lora=raw.get("lora"),
        lora_scale=float(raw.get("lora_scale", 1.0)),
        kind=kind,
        variant=raw.get("variant", ""),
        subfolder=raw.get("subfolder"),
        weight_name=raw.get("weight_name"),
        image_encoder_folder=raw.get("image_encoder_folder"),
        tile_controlnet=raw.get("tile_controlnet"),
    )


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[str, ModelSpec]:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    table = {model_id: _parse(model_id, entry) for model_id, entry in raw.items()}
    for spec in table.values():
        if spec.base is not None and (spec.base not in table or table[spec.base].family != spec.family):
            raise ValueError(f"models.yaml: {spec.id} has base {spec.base!r}, not a registered {spec.family} model")
        tile = table.get(spec.tile_controlnet or "")
        if spec.tile_controlnet is not None and (tile is None or tile.kind != "controlnet" or tile.family != spec.family):
            raise ValueError(f"models.yaml: {spec.id} has tile_controlnet {spec.tile_controlnet!r}, not a registered "
                             f"{spec.family} ControlNet")
    return table


def _full_table(path: Path | None = None) -> dict[str, ModelSpec]:
    return _load_table(str(path or configs_dir() / "models.yaml"))


def registry(path: Path | None = None) -> dict[str, ModelSpec]:
    """The models (whole pipelines) by id; adjuncts (ControlNets, IP-Adapters) are in `adjuncts`."""
    return {k: s for k, s in _full_table(path).items() if s.kind == "model"}


def adjuncts(kind: str, path: Path | None = None) -> dict[str, ModelSpec]:
    """The registered adjuncts of `kind` ("controlnet", "ip_adapter") by id."""
    return {k: s for k, s in _full_table(path).items() if s.kind == kind}


def find_adjunct(kind: str, adjunct_id: str) -> ModelSpec | None:
    return adjuncts(kind).get(adjunct_id)


def get_spec(model_id: str) -> ModelSpec:
    table = registry()
    if model_id not in table:
        raise ModelNotFoundError(model_id, "not a registered id", known=sorted(table))
    return table[model_id]


def find_spec(model_id: str) -> ModelSpec | None:
    return registry().get(model_id)
