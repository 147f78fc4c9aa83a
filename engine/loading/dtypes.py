"""The loaders' `torch_dtype`: one dtype for every component, or a policy that picks one per component.

A policy is any callable `(component name, class name, config dict) -> torch.dtype` (the compiler's `DtypePolicy`),
so each component is read straight into its final dtype (an fp16 VAE that must stay fp32, a T5 kept fp32 under
fp16) and nothing is loaded in fp32 only to be cast afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

TorchDtype = Union[torch.dtype, Callable[[str, str, Mapping[str, Any]], torch.dtype]]


def component_dtype(torch_dtype: TorchDtype, name: str, class_name: str, config: Mapping[str, Any] | None) -> torch.dtype:
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    return torch_dtype(name, class_name, config or {})


def folder_config(folder: Path) -> dict[str, Any]:
    """A component folder's config.json (diffusers and transformers both write one), {} if absent or unreadable."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def module_config(module: torch.nn.Module) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def load_quantization(torch_dtype: TorchDtype, name: str, library: str, class_name: str) -> Any:
    """The quantization config a policy asks for (`policy.quantization(name, library, class_name)`), else None."""
    ask = getattr(torch_dtype, "quantization", None)
    return ask(name, library, class_name) if callable(ask) else None
