"""Which diffusers pipeline class runs a job: a table keyed by (family, mode, with ControlNet, denoiser variant).

The engine composes these classes over its own components (engine/pipelines/base.py) instead of re-deriving them.
Modes: "text2img", "img2img" (`image`, `strength`), "inpaint" (`image`, `mask_image`). The denoiser variant
"inpaint" is a denoiser that takes the masked image as extra input channels (a 9-channel SD UNet, FLUX Fill); it
only runs inpainting. A combination diffusers has no class for is absent, and `mode_spec` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class ModeSpec:
    pipeline: str  # diffusers class name
    control_image_arg: str = "control_image"  # the `__call__` keyword taking the ControlNet image(s)

    def resolve(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)


# (family, mode, controlnet, denoiser variant) -> class
MODES: dict[tuple[str, str, bool, str], ModeSpec] = {
    ("sd15", "text2img", False, ""): ModeSpec("StableDiffusionPipeline"),
    ("sd15", "img2img", False, ""): ModeSpec("StableDiffusionImg2ImgPipeline"),
    ("sd15", "inpaint", False, ""): ModeSpec("StableDiffusionInpaintPipeline"),
    ("sd15", "inpaint", False, "inpaint"): ModeSpec("StableDiffusionInpaintPipeline"),
    ("sd15", "text2img", True, ""): ModeSpec("StableDiffusionControlNetPipeline", control_image_arg="image"),
    ("sd15", "img2img", True, ""): ModeSpec("StableDiffusionControlNetImg2ImgPipeline"),
    ("sd15", "inpaint", True, ""): ModeSpec("StableDiffusionControlNetInpaintPipeline"),
    ("sd15", "inpaint", True, "inpaint"): ModeSpec("StableDiffusionControlNetInpaintPipeline"),
    ("sdxl", "text2img", False, ""): ModeSpec("StableDiffusionXLPipeline"),
    ("sdxl", "img2img", False, ""): ModeSpec("StableDiffusionXLImg2ImgPipeline"),
    ("sdxl", "inpaint", False, ""): ModeSpec("StableDiffusionXLInpaintPipeline"),
    ("sdxl", "inpaint", False, "inpaint"): ModeSpec("StableDiffusionXLInpaintPipeline"),
    ("sdxl", "text2img", True, ""): ModeSpec("StableDiffusionXLControlNetPipeline", control_image_arg="image"),
    ("sdxl", "img2img", True, ""): ModeSpec("StableDiffusionXLControlNetImg2ImgPipeline"),
    ("sdxl", "inpaint", True, ""): ModeSpec("StableDiffusionXLControlNetInpaintPipeline"),
    ("sdxl", "inpaint", True, "inpaint"): ModeSpec("StableDiffusionXLControlNetInpaintPipeline"),
    ("flux", "text2img", False, ""): ModeSpec("FluxPipeline"),
    ("flux", "img2img", False, ""): ModeSpec("FluxImg2ImgPipeline"),
    ("flux", "inpaint", False, ""): ModeSpec("FluxInpaintPipeline"),
    ("flux", "inpaint", False, "inpaint"): ModeSpec("FluxFillPipeline"),
    ("flux", "text2img", True, ""): ModeSpec("FluxControlNetPipeline"),
    ("flux", "img2img", True, ""): ModeSpec("FluxControlNetImg2ImgPipeline"),
    ("flux", "inpaint", True, ""): ModeSpec("FluxControlNetInpaintPipeline"),
}

_FIELD = {"text2img": "image", "img2img": "image", "inpaint": "mask_image"}


def mode_spec(family: str, mode: str, controlnet: bool, variant: str = "") -> ModeSpec:
    spec = MODES.get((family, mode, controlnet, variant))
    if spec is not None:
        return spec
    if variant == "inpaint" and mode != "inpaint":
        raise InvalidRequestError("mask_image", f"this {family} model's denoiser is an inpainting one (it takes the "
                                  "masked image as extra channels): pass image and mask_image")
    field = "controlnets" if controlnet else _FIELD[mode]
    raise InvalidRequestError(field, f"diffusers has no {family} pipeline for {mode}"
                              f"{' with ControlNet' if controlnet else ''}"
                              f"{' on an inpainting denoiser' if variant else ''}")
