"""A stock diffusers pipeline object around components we already hold (no copy): used to save folders in diffusers'
own format and to reach diffusers' LoRA loaders, which live on the pipeline classes."""

from __future__ import annotations

import inspect
from typing import Any

from ..families import get_family


def build_stock_pipeline(family_name: str, components: dict[str, Any], pipeline_class: str | None = None) -> Any:
    """`pipeline_class` (a diffusers class name) defaults to the family's text-to-image pipeline."""
    import diffusers

    cls = getattr(diffusers, pipeline_class or get_family(family_name).stock_pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    for name, p in params.items():
        if name == "self" or name in kwargs or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if name == "requires_safety_checker":
            kwargs[name] = False
        elif p.default is inspect.Parameter.empty:
            kwargs[name] = None  # optional components we do not hold (safety checker, feature extractor, ...)
    return cls(**kwargs)
