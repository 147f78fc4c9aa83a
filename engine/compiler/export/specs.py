"""What each exportable component takes, within which shape profile, and how the pipelines call it.

Profiles come from what the pipelines can ask for: image sizes within the family's bounds (optimal at the VAE's
native `sample_size`), up to the request limit of images (times two for classifier-free guidance), prompts padded to
the tokenizer's length. A request inside those bounds never falls outside an exported profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...families import FamilySpec
from .onnx_export import Dim, ExportSpec, TensorSpec, clamp_dim


class UnsupportedComponent(Exception):
    """The component has a variant the exporter does not describe (e.g. a UNet with class labels)."""


def max_images_per_request() -> int:
    """The `num_images` limit of GenerateRequest (its `le` bound), so profiles follow the API."""
    from ...requests import GenerateRequest

    for meta in GenerateRequest.model_fields["num_images"].metadata:
        if getattr(meta, "le", None) is not None:
            return int(meta.le)
    return 8


@dataclass(frozen=True)
class SizeProfile:
    """Image sizes in pixels (min, opt, max) and batch bounds the exported components must accept."""

    min_px: int
    opt_px: int
    max_px: int
    images: int  # most images per request
    cfg: bool  # whether the denoiser usually runs two branches (batch doubled)

    @classmethod
    def for_family(cls, family: FamilySpec, vae: Any) -> SizeProfile:
        native = int(getattr(vae.config, "sample_size", 0) or family.min_size)
        opt = min(max(native, family.min_size), family.max_size)
        return cls(family.min_size, opt, family.max_size, max_images_per_request(), family.uses_negative_prompt)


def vae_scale(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _non_multiple(start: int, factor: int) -> int:
    """The first size >= start that is not a multiple of `factor` (traces the general, forwarded-size path)."""
    size = start
    while factor > 1 and size % factor == 0:
        size += 1
    return size


def denoiser_batch(p: SizeProfile) -> Dim:
    return clamp_dim("batch", 1, 2 if p.cfg else 1, 2 * p.images, 2)


def unet_spec(unet: torch.nn.Module, p: SizeProfile, scale: int, text_len: int) -> ExportSpec:
    c: Any = unet.config  # diffusers FrozenDict with attribute access
    if getattr(c, "class_embed_type", None) is not None or c.num_class_embeds is not None:
        raise UnsupportedComponent("UNet with class labels")
    if c.addition_embed_type not in (None, "text_time"):
        raise UnsupportedComponent(f"UNet addition_embed_type={c.addition_embed_type!r}")
    up = 2 ** getattr(unet, "num_upsamplers", 0)
    lo, hi = p.min_px // scale, p.max_px // scale
    h_trace = _non_multiple(max(lo, 2 * up), up)
    w_trace = _non_multiple(h_trace + 1, up)
    batch = denoiser_batch(p)
    h = clamp_dim("latent_height", lo, p.opt_px // scale, hi, h_trace)
    w = clamp_dim("latent_width", lo, p.opt_px // scale, hi, w_trace)
    seq = clamp_dim("text_len", 1, text_len, text_len, text_len)
    inputs = [TensorSpec("sample", (batch, c.in_channels, h, w)),
              TensorSpec("timestep", (batch,), "fp32", "unit"),
              TensorSpec("encoder_hidden_states", (batch, seq, c.cross_attention_dim))]
    if c.time_cond_proj_dim is not None:
        inputs.append(TensorSpec("timestep_cond", (batch, c.time_cond_proj_dim)))
    if c.addition_embed_type == "text_time":
        text_embeds = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", (batch, text_embeds)), TensorSpec("time_ids", (batch, 6))]
    out_channels = c.out_channels
    return ExportSpec(
        component="unet", inputs=tuple(inputs), output="noise_pred",
        output_axes={0: "batch", 2: "latent_height", 3: "latent_width"},
        output_shape=lambda x: (x["sample"].shape[0], out_channels, *x["sample"].shape[2:]),
        call=_call_unet)


def _call_unet(unet: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "text_embeds" in x else None
    return unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                timestep_cond=x.get("timestep_cond"), added_cond_kwargs=added, return_dict=False)[0]


def flux_spec(transformer: torch.nn.Module, p: SizeProfile, scale: int, text_len: int) -> ExportSpec:
    c: Any = transformer.config
    patch = 2 * scale  # latents are packed 2x2 into tokens
    tokens = clamp_dim("image_tokens", (p.min_px // patch) ** 2, (p.opt_px // patch) ** 2, (p.max_px // patch) ** 2,
                       20)
    seq = clamp_dim("text_len", 1, text_len, text_len, 12)
    batch = denoiser_batch(p)
    inputs = [TensorSpec("hidden_states", (batch, tokens, c.in_channels)),
              TensorSpec("timestep", (batch,), "fp32", "unit")]
    if c.guidance_embeds:
        inputs.append(TensorSpec("guidance", (batch,), "fp32", "unit"))
    inputs += [TensorSpec("pooled_projections", (batch, c.pooled_projection_dim)),
               TensorSpec("encoder_hidden_states", (batch, seq, c.joint_attention_dim)),
               TensorSpec("txt_ids", (seq, 3), "fp32", "ids"),
               TensorSpec("img_ids", (tokens, 3), "fp32", "ids")]
    proj_out: Any = transformer.get_submodule("proj_out")
    out_features = int(proj_out.out_features)
    return ExportSpec(
        component="transformer", inputs=tuple(inputs), output="noise_pred",
        output_axes={0: "batch", 1: "image_tokens"},
        output_shape=lambda x: (*x["hidden_states"].shape[:2], out_features),
        call=_call_flux)


def _call_flux(transformer: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(hidden_states=x["hidden_states"], timestep=x["timestep"], guidance=x.get("guidance"),
                       pooled_projections=x["pooled_projections"], encoder_hidden_states=x["encoder_hidden_states"],
                       txt_ids=x["txt_ids"], img_ids=x["img_ids"], joint_attention_kwargs={}, return_dict=False)[0]


def vae_decoder_spec(vae: torch.nn.Module, p: SizeProfile) -> ExportSpec:
    c: Any = vae.config
    scale = vae_scale(vae)
    lo, hi = p.min_px // scale, p.max_px // scale
    batch = clamp_dim("batch", 1, 1, p.images, 2)
    h = clamp_dim("latent_height", lo, p.opt_px // scale, hi, lo + 1)
    w = clamp_dim("latent_width", lo, p.opt_px // scale, hi, lo + 2)
    out_channels = c.out_channels
    return ExportSpec(
        component="vae_decoder", inputs=(TensorSpec("latents", (batch, c.latent_channels, h, w)),), output="image",
        output_axes={0: "batch", 2: "height", 3: "width"},
        output_shape=lambda x: (x["latents"].shape[0], out_channels, x["latents"].shape[2] * scale,
                                x["latents"].shape[3] * scale),
        call=_call_vae_decoder)


def _call_vae_decoder(vae: Any, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return vae.decode(x["latents"], return_dict=False)[0]


def tokenizer_length(components: dict[str, Any], name: str, cap: int) -> int:
    tokenizer = components.get(name)
    length = int(getattr(tokenizer, "model_max_length", cap) or cap)
    return min(length, cap)


def denoiser_spec(kind: str, module: torch.nn.Module, components: dict[str, Any], p: SizeProfile) -> ExportSpec:
    """The spec of the family's denoiser: the UNet (prompt padded to CLIP's length) or the FLUX transformer (T5
    sequence up to 512 tokens, the pipelines' cap)."""
    scale = vae_scale(components["vae"])
    if kind == "unet":
        return unet_spec(module, p, scale, tokenizer_length(components, "tokenizer", 77))
    if kind == "transformer" and type(module).__name__ == "FluxTransformer2DModel":
        return flux_spec(module, p, scale, tokenizer_length(components, "tokenizer_2", 512))
    raise UnsupportedComponent(f"no export spec for {type(module).__name__}")
