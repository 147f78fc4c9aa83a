"""FLUX.1: CLIP pooled + T5 sequence conditioning, an MM-DiT over 2x2-packed latents with RoPE position ids,
flow matching with a resolution-dependent shift, and (dev) guidance distilled into an embedding.

Negative prompts only act through "true CFG" (`true_cfg_scale > 1`), as in diffusers; here the two branches run
batched in one transformer forward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import (
    GenerationParams,
    StepCallback,
    TextToImagePipeline,
    draw_noise,
    fresh_scheduler,
    module_dtype,
    tokenize,
)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The flow-matching shift `mu`, linear in the number of image tokens (FLUX's published schedule)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: each 2x2 patch becomes one token."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent grid of h x w."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE position ids (0, row, col) for each packed token."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxEnginePipeline(TextToImagePipeline):
    family = "flux"

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        super().__init__(components, device, config)
        self.transformer = components["transformer"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer_2 = components["tokenizer_2"]

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def uses_true_cfg(self, params: GenerationParams) -> bool:
        return params.true_cfg_scale > 1.0 and params.negative_prompt is not None

    def _encode_one(self, prompt: str, max_sequence_length: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenize(self.tokenizer, [prompt], self.tokenizer.model_max_length, "the CLIP text encoder")
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=module_dtype(self.text_encoder), device=self.device)
        ids2 = tokenize(self.tokenizer_2, [prompt], max_sequence_length, "the T5 text encoder")
        seq = self.text_encoder_2(ids2.to(self.device), output_hidden_states=False)[0]
        seq = seq.to(dtype=module_dtype(self.text_encoder_2), device=self.device)
        return seq.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)

    def encode(self, params: GenerationParams) -> dict[str, Any]:
        max_len = params.max_sequence_length or 512
        n = params.num_images
        seq, pooled = self._encode_one(params.prompt, max_len, n)
        if self.uses_true_cfg(params):
            neg_seq, neg_pooled = self._encode_one(params.negative_prompt or "", max_len, n)
            seq, pooled = torch.cat([neg_seq, seq]), torch.cat([neg_pooled, pooled])
        text_ids = torch.zeros(seq.shape[1], 3).to(device=self.device, dtype=module_dtype(self.text_encoder))
        return {"encoder_hidden_states": seq, "pooled_projections": pooled, "txt_ids": text_ids}

    def _latent_grid(self, params: GenerationParams) -> tuple[int, int]:
        return (2 * (params.height // (self.vae_scale_factor * 2)), 2 * (params.width // (self.vae_scale_factor * 2)))

    def denoise(self, params: GenerationParams, cond: dict[str, Any], generator: torch.Generator,
                step_callback: StepCallback | None) -> torch.Tensor:
        n = params.num_images
        h, w = self._latent_grid(params)
        # Latents and scheduler math stay fp32; only the transformer's inputs take its (possibly half) dtype.
        dtype = module_dtype(self.transformer)
        channels = self.transformer.config.in_channels // 4
        latents = pack_latents(draw_noise((n, channels, h, w), generator, self.device, torch.float32))
        img_ids = latent_image_ids(h // 2, w // 2, self.device, cond["encoder_hidden_states"].dtype)
        seq = cond["encoder_hidden_states"].to(dtype)
        pooled = cond["pooled_projections"].to(dtype)

        scheduler = fresh_scheduler(self.scheduler, params.scheduler, self.family)
        steps = params.num_inference_steps
        sigmas = None if getattr(scheduler.config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        timesteps = scheduler.timesteps
        scheduler.set_begin_index(0)

        true_cfg = self.uses_true_cfg(params)
        rows = 2 * n if true_cfg else n
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32).expand(rows)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents, latents]) if true_cfg else latents
            timestep = t.expand(rows).to(latents.dtype)
            with self._cache_context():
                noise_pred = self.transformer(hidden_states=model_in.to(dtype), timestep=timestep / 1000,
                                              guidance=guidance, pooled_projections=pooled, encoder_hidden_states=seq,
                                              txt_ids=cond["txt_ids"], img_ids=img_ids, joint_attention_kwargs={},
                                              return_dict=False)[0].float()
            if true_cfg:
                neg, pos = noise_pred.chunk(2)
                noise_pred = neg + params.true_cfg_scale * (pos - neg)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if step_callback is not None:
                step_callback(i, len(timesteps), latents)
        return latents

    def _cache_context(self) -> Any:
        """Step-cache hooks keep state per named context; diffusers' pipelines name the conditional branch "cond"."""
        if getattr(self.transformer, "is_cache_enabled", False):
            return self.transformer.cache_context("cond")
        return contextlib.nullcontext()

    def decode(self, params: GenerationParams, latents: torch.Tensor) -> list[Image.Image]:
        h, w = self._latent_grid(params)
        latents = unpack_latents(latents, h, w)
        config = self.vae.config
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        latents = latents.to(device=self.device, dtype=module_dtype(self.vae))
        return self._to_pil(self.vae.decode(latents, return_dict=False)[0])
