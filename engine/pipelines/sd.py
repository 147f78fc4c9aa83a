"""SD 1.5 and SDXL: CLIP text encoders, a UNet denoiser with batched classifier-free guidance, a KL VAE.

SDXL adds a second (projected) text encoder whose pooled output and the micro-conditioning time ids
(original size, crop, target size) enter the UNet as `added_cond_kwargs`.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import (
    GenerationParams,
    StepCallback,
    TextToImagePipeline,
    draw_noise,
    extra_step_kwargs,
    fresh_scheduler,
    module_dtype,
    tokenize,
)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of (guidance - 1) for guidance-distilled (LCM) UNets (`time_cond_proj_dim`)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class StableDiffusionEnginePipeline(TextToImagePipeline):
    """SD 1.5 (and the shared UNet denoising loop that SDXL reuses)."""

    family = "sd15"

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        super().__init__(components, device, config)
        self.unet = components["unet"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]

    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def uses_cfg(self, params: GenerationParams) -> bool:
        """Classifier-free guidance (a negative branch) runs when guidance > 1, except for guidance-distilled (LCM)
        UNets: they take the scale as `timestep_cond` instead, as in diffusers' `do_classifier_free_guidance`."""
        return params.guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    # -- encode -------------------------------------------------------------------------------------------------
    def _clip_hidden(self, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts, max_length, "the CLIP text encoder")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").attention_mask.to(self.device)
        out = self.text_encoder(ids.to(self.device), attention_mask=mask)[0]
        return out.to(dtype=module_dtype(self.text_encoder), device=self.device)

    def encode(self, params: GenerationParams) -> dict[str, Any]:
        n = params.num_images
        embeds = self._clip_hidden([params.prompt], self.tokenizer.model_max_length)
        embeds = embeds.repeat_interleave(n, dim=0)
        if self.uses_cfg(params):
            negative = self._clip_hidden([params.negative_prompt or ""], embeds.shape[1])
            embeds = torch.cat([negative.repeat_interleave(n, dim=0), embeds])
        return {"encoder_hidden_states": embeds}

    # -- denoise ------------------------------------------------------------------------------------------------
    def added_cond_kwargs(self, params: GenerationParams, cond: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        return None

    def denoise(self, params: GenerationParams, cond: dict[str, Any], generator: torch.Generator,
                step_callback: StepCallback | None) -> torch.Tensor:
        scheduler = fresh_scheduler(self.scheduler, params.scheduler, self.family)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        # Latents and scheduler math stay fp32; only the UNet's inputs take its (possibly half) dtype.
        unet_dtype = module_dtype(self.unet)
        embeds = cond["encoder_hidden_states"].to(unet_dtype)
        batch = params.num_images
        shape = (batch, self.unet.config.in_channels, params.height // self.vae_scale_factor,
                 params.width // self.vae_scale_factor)
        latents = draw_noise(shape, generator, self.device, torch.float32) * scheduler.init_noise_sigma
        step_kwargs = extra_step_kwargs(scheduler, generator)
        cfg = self.uses_cfg(params)
        added = self.added_cond_kwargs(params, cond)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(params.guidance_scale - 1).repeat(batch)
            timestep_cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim, latents.dtype)
            timestep_cond = timestep_cond.to(device=self.device, dtype=unet_dtype)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise_pred = self.unet(model_in.to(unet_dtype), t, encoder_hidden_states=embeds,
                                   timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False)[0].float()
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + params.guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if step_callback is not None:
                step_callback(i, len(timesteps), latents)
        return latents

    # -- decode -------------------------------------------------------------------------------------------------
    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / config.scaling_factor + mean_t
        return latents / config.scaling_factor

    def decode(self, params: GenerationParams, latents: torch.Tensor) -> list[Image.Image]:
        latents = self.unscale_latents(latents).to(device=self.device, dtype=module_dtype(self.vae))
        decoded = self.vae.decode(latents, return_dict=False)[0]
        return self._to_pil(decoded)


class StableDiffusionXLEnginePipeline(StableDiffusionEnginePipeline):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embeds and size time ids."""

    family = "sdxl"

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        super().__init__(components, device, config)
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer_2 = components["tokenizer_2"]
        # Stock SDXL zeroes the negative branch when no negative prompt is given (config of the pipeline folder).
        self.force_zeros_for_empty_prompt = bool(self.config.get("force_zeros_for_empty_prompt", True))

    def _encode_pair(self, prompts: list[str], max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenize(tokenizer, prompts, max_length or tokenizer.model_max_length, "an SDXL text encoder")
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, params: GenerationParams) -> dict[str, Any]:
        n = params.num_images
        embeds, pooled = self._encode_pair([params.prompt], None)
        dtype = module_dtype(self.text_encoder_2)
        embeds = embeds.to(dtype=dtype, device=self.device).repeat_interleave(n, dim=0)
        pooled = pooled.to(dtype=dtype, device=self.device).repeat_interleave(n, dim=0)
        if self.uses_cfg(params):
            if params.negative_prompt is None and self.force_zeros_for_empty_prompt:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode_pair([params.negative_prompt or ""], embeds.shape[1])
                neg = neg.to(dtype=dtype, device=self.device).repeat_interleave(n, dim=0)
                neg_pooled = neg_pooled.to(dtype=dtype, device=self.device).repeat_interleave(n, dim=0)
            embeds = torch.cat([neg, embeds])
            pooled = torch.cat([neg_pooled, pooled])
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def added_cond_kwargs(self, params: GenerationParams, cond: dict[str, Any]) -> dict[str, torch.Tensor]:
        size = (params.height, params.width)
        time_ids = torch.tensor([list(size + (0, 0) + size)], dtype=cond["encoder_hidden_states"].dtype)
        expected = self.unet.add_embedding.linear_1.in_features
        got = self.unet.config.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        if expected != got:
            raise ValueError(f"UNet expects {expected} added-condition features, the text encoder gives {got}")
        rows = 2 if self.uses_cfg(params) else 1
        time_ids = time_ids.repeat(rows, 1).to(self.device).repeat(params.num_images, 1)
        dtype = module_dtype(self.unet)
        return {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": time_ids.to(dtype)}
