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
    # Adjuncts and variants, as data: the diffusers class of this family's ControlNets, and the stock pipeline of
    # each model variant whose denoiser takes more than the latents (e.g. "inpaint": a UNet with 9 input channels,
    # FLUX Fill with masked-image and mask channels), which is also that variant's `_class_name` in model_index.json.
    controlnet_class: str = ""
    variant_pipelines: tuple[tuple[str, str], ...] = ()
    # Whether a request may bring an IP-Adapter (diffusers' `load_ip_adapter`, loaded into the denoiser per job).
    ip_adapter: bool = False

    def variant_pipeline(self, variant: str) -> str:
        """The stock diffusers class of `variant` ("" is the base model)."""
        if not variant:
            return self.stock_pipeline
        for name, cls in self.variant_pipelines:
            if name == variant:
                return cls
        known = ", ".join(n for n, _ in self.variant_pipelines) or "none"
        raise ValueError(f"{self.name} has no model variant {variant!r}; known: {known}")


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
        controlnet_class="ControlNetModel",
        variant_pipelines=(("inpaint", "StableDiffusionInpaintPipeline"),),
        ip_adapter=True,
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
        controlnet_class="ControlNetModel",
        variant_pipelines=(("inpaint", "StableDiffusionXLInpaintPipeline"),),
        ip_adapter=True,
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
        controlnet_class="FluxControlNetModel",
        variant_pipelines=(("inpaint", "FluxFillPipeline"),),
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


def variant_of_pipeline_class(class_name: str) -> str:
    """The model variant a diffusers `_class_name` (model_index.json) stands for: "inpaint" for the class that
    inpainting/fill checkpoints are saved under (StableDiffusionInpaintPipeline, FluxFillPipeline, ...), else ""."""
    for spec in FAMILIES.values():
        for variant, cls in spec.variant_pipelines:
            if class_name == cls:
                return variant
    return ""
