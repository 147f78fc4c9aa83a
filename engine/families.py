"""Model families: what differs between SD 1.5, SDXL and FLUX, as data.

Everything that depends on the family (its components, the denoiser's name, the size factor, the stock diffusers
pipeline that serves as the oracle, our pipeline class) is read from this table, never branched on by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str
    task: str  # "text-to-image" or "upscale"
    components: tuple[str, ...]  # diffusers component names a complete pipeline holds
    denoiser: str  # "unet" or "transformer"
    size_multiple: int  # width/height must be multiples of this (VAE factor x packing)
    min_size: int
    max_size: int
    stock_pipeline: str  # diffusers class: the oracle, and `_class_name` in model_index.json
    pipeline: str  # our pipeline class, "module:Class" under engine.pipelines
    uses_negative_prompt: bool  # whether guidance runs a second, negative branch by default


FAMILIES: dict[str, FamilySpec] = {
    "sd15": FamilySpec(
        name="sd15",
        task="text-to-image",
        components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
        denoiser="unet",
        size_multiple=8,
        min_size=64,
        max_size=2048,
        stock_pipeline="StableDiffusionPipeline",
        pipeline="sd:StableDiffusionEnginePipeline",
        uses_negative_prompt=True,
    ),
    "sdxl": FamilySpec(
        name="sdxl",
        task="text-to-image",
        components=("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
        denoiser="unet",
        size_multiple=8,
        min_size=64,
        max_size=4096,
        stock_pipeline="StableDiffusionXLPipeline",
        pipeline="sd:StableDiffusionXLEnginePipeline",
        uses_negative_prompt=True,
    ),
    "flux": FamilySpec(
        name="flux",
        task="text-to-image",
        components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
        denoiser="transformer",
        size_multiple=16,
        min_size=64,
        max_size=4096,
        stock_pipeline="FluxPipeline",
        pipeline="flux:FluxEnginePipeline",
        uses_negative_prompt=False,
    ),
    "aurasr": FamilySpec(
        name="aurasr",
        task="upscale",
        components=("upsampler",),
        denoiser="",
        size_multiple=1,
        min_size=1,
        max_size=8192,
        stock_pipeline="",
        pipeline="aurasr:AuraSRPipeline",
        uses_negative_prompt=False,
    ),
}


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_pipeline_class(class_name: str) -> FamilySpec | None:
    """Map a diffusers `_class_name` from model_index.json to a family (img2img/inpaint variants share it)."""
    for spec in FAMILIES.values():
        if class_name == spec.stock_pipeline:
            return spec
    prefixes = {"StableDiffusionXL": "sdxl", "StableDiffusion": "sd15", "Flux": "flux"}
    for prefix, fam in prefixes.items():
        if class_name.startswith(prefix):
            return FAMILIES[fam]
    return None
