"""The model registry: a table of typed `ModelSpec`s read from configs/models.yaml."""

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


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str
    source: str  # hub repository id, or "tiny:<name>" for an offline seeded build
    defaults: ModelDefaults
    description: str = ""
    arch: str | None = None  # configs/arch/<arch>/ for offline single-file loading
    endpoints: tuple[str, ...] = field(default_factory=tuple)

    @property
    def family_spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith("tiny:")

    @property
    def tiny_config(self) -> str | None:
        return self.source.split(":", 1)[1] if self.is_tiny else None

    def available_offline(self) -> bool:
        """Tiny models are always available; hub models when a snapshot is already in the local HF cache."""
        if self.is_tiny:
            return True
        from .loading.pretrained import cached_snapshot

        return cached_snapshot(self.source) is not None


def _parse(model_id: str, raw: dict[str, Any]) -> ModelSpec:
    defaults = ModelDefaults(**raw.get("defaults", {}))
    family = get_family(raw["family"])  # validate early: a typo in the table fails at load, not at request time
    if family.task == "text-to-image":
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
    )


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[str, ModelSpec]:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    return {model_id: _parse(model_id, entry) for model_id, entry in raw.items()}


def registry(path: Path | None = None) -> dict[str, ModelSpec]:
    return _load_table(str(path or configs_dir() / "models.yaml"))


def get_spec(model_id: str) -> ModelSpec:
    table = registry()
    if model_id not in table:
        raise ModelNotFoundError(model_id, "not a registered id", known=sorted(table))
    return table[model_id]


def find_spec(model_id: str) -> ModelSpec | None:
    return registry().get(model_id)
