"""SD 1.5 and SDXL over diffusers' StableDiffusion* pipeline classes (engine/pipelines/base.py): how the prompt is
encoded (the class's `encode_prompt`, once per prompt, cached) and how final latents are unscaled for the VAE."""

from __future__ import annotations

from typing import Any

import torch

from .base import GenerationParams, TextToImagePipeline, warn_if_truncated


class StableDiffusionEnginePipeline(TextToImagePipeline):
    """SD 1.5: a CLIP text encoder, a UNet, a KL VAE."""

    family = "sd15"
    denoiser_name = "unet"

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        super().__init__(components, device, config)
        self.unet = components["unet"]

    def denoiser_variant(self) -> str:
        """A 9-channel UNet (noise + masked image latents + mask) only inpaints."""
        return "inpaint" if self.unet.config.in_channels == 9 else ""

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' `do_classifier_free_guidance`: guidance > 1, except for guidance-distilled (LCM) UNets, which
        take the scale as `timestep_cond`."""
        return params.guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def _warn_truncation(self, params: GenerationParams) -> None:
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = self.components.get(name)
            if tokenizer is not None:
                for prompt in {params.prompt, params.negative_prompt or ""}:
                    warn_if_truncated(tokenizer, prompt, tokenizer.model_max_length, f"the {name} text encoder")

    def encode(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        self._warn_truncation(params)
        embeds, negative = pipe.encode_prompt(params.prompt, self.device, 1, self.uses_cfg(params),
                                              negative_prompt=params.negative_prompt)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def unscale_latents(self, pipe: Any, params: GenerationParams, latents: torch.Tensor) -> torch.Tensor:
        """As the SDXL pipelines decode: `latents_mean`/`latents_std` when the VAE has them, else the scaling."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / config.scaling_factor + mean_t
        return latents / config.scaling_factor


class StableDiffusionXLEnginePipeline(StableDiffusionEnginePipeline):
    """SDXL: two text encoders, pooled embeds; size time ids are the class's (`_get_add_time_ids`)."""

    family = "sdxl"

    def encode(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        self._warn_truncation(params)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            params.prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.uses_cfg(params), negative_prompt=params.negative_prompt)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}
