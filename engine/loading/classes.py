"""The component classes a model folder may name. A folder's model_index.json is data from outside: it may only
pick classes from this table, never make us import an arbitrary module."""

from __future__ import annotations

import importlib
from typing import Any

# (library, class name) as written in model_index.json -> kind of component
ALLOWED_CLASSES: dict[tuple[str, str], str] = {
    ("diffusers", "UNet2DConditionModel"): "model",
    ("diffusers", "FluxTransformer2DModel"): "model",
    ("diffusers", "AutoencoderKL"): "model",
    ("diffusers", "AutoencoderTiny"): "model",
    ("transformers", "CLIPTextModel"): "model",
    ("transformers", "CLIPTextModelWithProjection"): "model",
    ("transformers", "T5EncoderModel"): "model",
    ("transformers", "CLIPTokenizer"): "tokenizer",
    ("transformers", "CLIPTokenizerFast"): "tokenizer",
    ("transformers", "T5Tokenizer"): "tokenizer",
    ("transformers", "T5TokenizerFast"): "tokenizer",
    **{
        ("diffusers", name): "scheduler"
        for name in (
            "PNDMScheduler",
            "DDIMScheduler",
            "DDPMScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "DPMSolverSDEScheduler",
            "LMSDiscreteScheduler",
            "HeunDiscreteScheduler",
            "UniPCMultistepScheduler",
            "LCMScheduler",
            "TCDScheduler",
            "FlowMatchEulerDiscreteScheduler",
        )
    },
}


def resolve_class(library: str, class_name: str) -> type[Any]:
    """Import an allowed class; anything else is refused."""
    if (library, class_name) not in ALLOWED_CLASSES:
        raise KeyError(f"{library}.{class_name} is not a component class this engine loads")
    module = importlib.import_module(library)
    # transformers 5 dropped the *Fast aliases for tokenizers that are always tokenizers-backed
    if not hasattr(module, class_name) and class_name.endswith("Fast"):
        class_name = class_name[: -len("Fast")]
    return getattr(module, class_name)


def component_kind(library: str, class_name: str) -> str | None:
    return ALLOWED_CLASSES.get((library, class_name))
