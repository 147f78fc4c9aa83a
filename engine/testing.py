"""Helpers for smoke runs and tests that need artifacts nobody ships: a random-weight LoRA for any registry model.

`random_lora(model, path)` writes a diffusers-format LoRA (the layout `save_lora_weights` produces) on the attention
projections of the model's denoiser (UNet or FLUX transformer). The denoiser is built on the meta device from its
config only, so this costs no weights and no time even for a 12 B-parameter model; only the low-rank matrices are
real, seeded, and scaled so the adapter changes an image visibly without overflowing it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as PEFT names them (tests/test_lora.py too)


def model_folder(model: str) -> Path:
    """The diffusers folder of a registry model: built for tiny ones, the cached snapshot for hub ones."""
    from .loading.pretrained import cached_snapshot
    from .loading.tiny import ensure_tiny_model
    from .registry import get_spec

    spec = get_spec(model)
    if spec.is_tiny:
        return ensure_tiny_model(spec.tiny_config or "")
    folder = cached_snapshot(spec.base and get_spec(spec.base).source or spec.source)
    if folder is None:
        raise FileNotFoundError(f"{model}: no local snapshot of {spec.source}")
    return Path(folder)


def _denoiser_on_meta(model: str) -> tuple[str, torch.nn.Module]:
    import diffusers

    from .registry import get_spec

    family = get_spec(model).family_spec
    folder = model_folder(model)
    cls = diffusers.UNet2DConditionModel if family.denoiser == "unet" else diffusers.FluxTransformer2DModel
    config = cls.load_config(str(folder), subfolder=family.denoiser)
    with torch.device("meta"):
        return family.denoiser, cls.from_config(config)


def lora_state(module: torch.nn.Module, rank: int = 4, seed: int = 0, strength: float = 0.5,
               targets: tuple[str, ...] = TARGETS) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights (`<module>.lora_A.weight` / `.lora_B.weight`) for every Linear whose name ends with
    one of `targets`. B·A has a spectral scale of about `strength` relative to a unit-scale weight."""
    generator = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, torch.nn.Linear) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        a = torch.randn(rank, sub.in_features, generator=generator) / math.sqrt(sub.in_features)
        b = torch.randn(sub.out_features, rank, generator=generator) * (strength / math.sqrt(rank))
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    if not state:
        raise ValueError(f"{type(module).__name__} has no Linear named like {', '.join(targets)}")
    return state


def random_lora(model: str, path: Path, *, rank: int = 4, seed: int = 0, strength: float = 0.5) -> Path:
    """Write a random LoRA for `model`'s denoiser to `path` (.safetensors) in diffusers' format; returns `path`."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    from .registry import get_spec

    denoiser, module = _denoiser_on_meta(model)
    state = convert_state_dict_to_diffusers(lora_state(module, rank, seed, strength))
    pipeline = getattr(diffusers, get_spec(model).family_spec.stock_pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = {f"{denoiser}_lora_layers": state}
    pipeline.save_lora_weights(save_directory=str(path.parent), weight_name=path.name, **layers)
    return path


__all__ = ["lora_state", "model_folder", "random_lora"]
