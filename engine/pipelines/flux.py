"""FLUX.1 over diffusers' Flux* pipeline classes (engine/pipelines/base.py): CLIP pooled + T5 sequence embeddings
from the class's `encode_prompt` (cached), and the packed latents unpacked and unscaled for the VAE.

Negative prompts act only through "true CFG" (`true_cfg_scale > 1`), as in diffusers."""

from __future__ import annotations

from typing import Any

import torch

from .base import GenerationParams, TextToImagePipeline, warn_if_truncated


class FluxEnginePipeline(TextToImagePipeline):
    family = "flux"
    denoiser_name = "transformer"

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        super().__init__(components, device, config)
        self.transformer = components["transformer"]

    def denoiser_variant(self) -> str:
        """FLUX Fill's transformer takes the masked image and the mask as extra channels: it only inpaints."""
        latent_channels = self.vae.config.latent_channels
        return "inpaint" if self.transformer.config.in_channels > 4 * latent_channels else ""

    def encodes_images(self, params: GenerationParams) -> bool:
        """FLUX ControlNets take the VAE-encoded control image."""
        return params.image is not None or bool(params.controls)

    def denoising_steps(self, steps: int, strength: float) -> int:
        """FLUX's `get_timesteps` rounds the other way: it keeps the last `steps * strength` steps, rounded up."""
        return steps - int(max(steps - steps * strength, 0))

    def uses_cfg(self, params: GenerationParams) -> bool:
        return params.true_cfg_scale > 1.0 and params.negative_prompt is not None

    def _max_length(self, params: GenerationParams) -> int:
        return params.max_sequence_length or 512

    def encode(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        prompts = [params.prompt] + ([params.negative_prompt or ""] if self.uses_cfg(params) else [])
        out: dict[str, Any] = {}
        for prompt, prefix in zip(prompts, ("", "negative_")):
            warn_if_truncated(self.components["tokenizer"], prompt, self.components["tokenizer"].model_max_length,
                              "the CLIP text encoder")
            warn_if_truncated(self.components["tokenizer_2"], prompt, self._max_length(params), "the T5 text encoder")
            embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=self.device, num_images_per_prompt=1,
                                                   max_sequence_length=self._max_length(params))
            out[f"{prefix}prompt_embeds"] = embeds
            out[f"{prefix}pooled_prompt_embeds"] = pooled
        return out

    def batched(self, cond: dict[str, Any], num_images: int) -> tuple[dict[str, Any], int]:
        """FLUX's `encode_prompt` repeats only what it encodes, so given embeddings come repeated per image (as
        `encode_prompt(..., num_images_per_prompt=n)` makes them) with one image per prompt."""
        return {k: v.repeat_interleave(num_images, dim=0) for k, v in cond.items()}, 1

    def call_kwargs(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        kwargs = super().call_kwargs(pipe, params)
        kwargs["max_sequence_length"] = self._max_length(params)
        if self.uses_cfg(params):
            kwargs["true_cfg_scale"] = params.true_cfg_scale
        return kwargs

    def unscale_latents(self, pipe: Any, params: GenerationParams, latents: torch.Tensor) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        config = self.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)
