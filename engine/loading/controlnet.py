"""Load a ControlNet named by a request (registry id, trusted local folder, hub id) for a model of a given family.

The family's ControlNet class is data (`FamilySpec.controlnet_class`); which family a ControlNet folder belongs to
is read from its config by a small signature table, so a ControlNet of another family is a 422 naming the request
field before anything heavy is loaded. Loaded ControlNets are kept in a small LRU cache keyed by the resolved
folder, dtype and device, so a ControlNet used by consecutive requests is read from disk once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError, ModelLoadError
from ..families import FAMILIES, get_family
from .adjuncts import hub_snapshot, resolve_adjunct
from .dtypes import TorchDtype, component_dtype

# What a ControlNet repository needs (fp16/bf16 duplicates and pickles are never fetched).
CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors",
                       "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-*.safetensors"]

# Config entries that tell families apart when they share a ControlNet class (SD 1.5 and SDXL: ControlNetModel).
FAMILY_SIGNATURES: dict[str, dict[str, Any]] = {
    "sd15": {"addition_embed_type": None},
    "sdxl": {"addition_embed_type": "text_time"},
    "flux": {},
}

# Config entries a ControlNet must share with the denoiser it feeds, by the denoiser's name: its residuals are added
# block by block (UNet) or per transformer block, over the same packed latents (FLUX: in_channels).
MATCHING_CONFIG: dict[str, tuple[str, ...]] = {
    "unet": ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type"),
    "transformer": ("in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                    "pooled_projection_dim"),
}

CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, str, str], torch.nn.Module] = OrderedDict()
_lock = threading.Lock()


def controlnet_family(config: dict[str, Any]) -> str | None:
    """The family a ControlNet config (its config.json) belongs to, or None when no family's class and signature
    match."""
    cls = config.get("_class_name", "")
    for name, spec in FAMILIES.items():
        signature = FAMILY_SIGNATURES.get(name)
        if spec.controlnet_class and cls == spec.controlnet_class and signature is not None and all(
                config.get(k) == v for k, v in signature.items()):
            return name
    return None


def _read_config(folder: Path, field: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InvalidRequestError(field, f"{folder.name!r} is not a ControlNet folder (no config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from None


def controlnet_folder(source: str, *, family: str, field: str = "controlnets[0].model") -> Path:
    """Resolve `source` to a local ControlNet folder of `family` for the current caller; 422 naming `field` when the
    caller may not use it or it belongs to another family."""
    get_family(family)
    resolved = resolve_adjunct(source, "controlnet", field)
    if resolved.spec is not None and resolved.spec.family != family:
        raise InvalidRequestError(field, f"ControlNet {source!r} is for {resolved.spec.family} models, not {family}",
                                  value=source)
    folder = resolved.folder or hub_snapshot(resolved.hub_id or "", CONTROLNET_PATTERNS, field)
    if folder.is_file():
        raise InvalidRequestError(field, "a ControlNet is a folder (config.json and safetensors weights), not a file")
    found = controlnet_family(_read_config(folder, field))
    if found != family:
        what = f"a {found} ControlNet" if found else "not a ControlNet this engine loads"
        raise InvalidRequestError(field, f"{source!r} is {what}; the model is {family}", value=source)
    return folder


def load_controlnet(source: str, *, family: str, torch_dtype: TorchDtype = torch.float32,
                    device: str | torch.device = "cpu", field: str = "controlnets[0].model") -> torch.nn.Module:
    """The ControlNet `source` (registry id, local folder for trusted callers, hub id) for a `family` model, in
    eval mode on `device`, from the cache when the same folder was loaded with the same dtype and device."""
    import diffusers

    folder = controlnet_folder(source, family=family, field=field)
    cls_name = get_family(family).controlnet_class
    config = _read_config(folder, field)
    dtype = component_dtype(torch_dtype, "controlnet", cls_name, config)
    key = (str(folder), str(dtype), str(torch.device(device)))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        model = getattr(diffusers, cls_name).from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                             use_safetensors=True, low_cpu_mem_usage=True)
    except Exception as e:  # corrupt weights, missing files, shape mismatch
        raise ModelLoadError(f"ControlNet {source!r}: cannot load {folder} ({type(e).__name__}: {e})") from None
    model = model.to(device).eval().requires_grad_(False)
    with _lock:
        _cache[key] = model
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model


def check_controlnet_fits(controlnet: torch.nn.Module, denoiser: torch.nn.Module, family: str,
                          field: str = "controlnets[0].model") -> None:
    """A 422 naming `field` when `controlnet` cannot feed this `family` model's `denoiser`: another class than the
    family's (`FamilySpec.controlnet_class`), or config entries that differ (`MATCHING_CONFIG`: same family, other
    widths, e.g. an SDXL ControlNet on an SD 1.5 UNet or a tiny one on a full-size model). Checked before the job,
    not found as a shape error inside the denoiser."""
    spec = get_family(family)
    if type(controlnet).__name__ != spec.controlnet_class:
        raise InvalidRequestError(field, f"is a {type(controlnet).__name__}; {family} models take a "
                                  f"{spec.controlnet_class}")
    for key in MATCHING_CONFIG[spec.denoiser]:
        mine, theirs = controlnet.config.get(key), denoiser.config.get(key)
        if key in controlnet.config and _norm(mine) != _norm(theirs):
            raise InvalidRequestError(field, f"the ControlNet's {key} is {mine!r}, this {family} model's "
                                      f"{spec.denoiser} has {theirs!r}: it belongs to another base model")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def clear_controlnet_cache() -> None:
    with _lock:
        _cache.clear()
