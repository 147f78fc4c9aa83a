"""Tiny SD 1.5 / SDXL / FLUX pipelines built here with stock diffusers and transformers classes and saved with
`save_pretrained`: the oracle side of the equivalence tests. Widths differ from the shipped tiny configs on purpose."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from engine.loading.tokenizers import build_clip_tokenizer, build_t5_tokenizer

CORPUS = "a lighthouse at dusk\nblurry low quality\nan astronaut riding a horse\nhighly detailed painting of a cat\n"


def _clip(tok, hidden, cls=transformers.CLIPTextModel, **extra):
    conf = transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, **extra)
    return cls(conf).eval()


def _vae(latent_channels=4, **extra):
    return diffusers.AutoencoderKL(block_out_channels=[8, 16, 16, 16], latent_channels=latent_channels,
                                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                   layers_per_block=1, norm_num_groups=8, sample_size=64, **extra).eval()


def build_sd15(path: Path, seed: int = 1) -> diffusers.StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = build_clip_tokenizer(CORPUS, 300)
    unet = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=24, attention_head_dim=4).eval()
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(tok, 24), tokenizer=tok, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


def build_sdxl(path: Path, seed: int = 2) -> diffusers.StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok, tok2 = build_clip_tokenizer(CORPUS, 300), build_clip_tokenizer(CORPUS, 320, pad_token="!")
    unet = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          attention_head_dim=(2, 4), use_linear_projection=True,
                                          addition_embed_type="text_time", addition_time_embed_dim=4,
                                          transformer_layers_per_block=(1, 1),
                                          projection_class_embeddings_input_dim=6 * 4 + 16,
                                          cross_attention_dim=16 + 24).eval()
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=_clip(tok, 16), tokenizer=tok,
        text_encoder_2=_clip(tok2, 24, transformers.CLIPTextModelWithProjection, projection_dim=16),
        tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path)
    return pipe


def build_flux(path: Path, seed: int = 3, guidance_embeds: bool = True) -> diffusers.FluxPipeline:
    torch.manual_seed(seed)
    tok, tok2 = build_clip_tokenizer(CORPUS, 300), build_t5_tokenizer(CORPUS, 120, model_max_length=64)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok2), d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
        is_encoder_decoder=False, use_cache=False)).eval()
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                   pooled_projection_dim=24, guidance_embeds=guidance_embeds,
                                                   axes_dims_rope=[2, 2, 4]).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                      use_post_quant_conv=False),
        text_encoder=_clip(tok, 24), tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(path)
    return pipe


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux}
