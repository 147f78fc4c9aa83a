"""dtype pass: the denoiser (and by default the text encoders) in half precision where the device supports it.

The VAE stays in fp32 when it would overflow: VAEs flagged `force_upcast` (SDXL's, FLUX's) produce inf/NaN in fp16.
bf16 has fp32's range, so with bf16 the VAE follows the compute dtype. T5 overflows in fp16 too and stays fp32 then.
"""

from __future__ import annotations

import torch

from ..runtime.device import best_half_dtype
from .context import PassContext

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BY_NAME = {v: k for k, v in NAMES.items()}


def _resolve(ctx: PassContext) -> torch.dtype:
    if ctx.config.dtype != "auto":
        return BY_NAME[ctx.config.dtype]
    return best_half_dtype(ctx.device) or torch.float32


def apply_dtype(ctx: PassContext) -> None:
    dtype = _resolve(ctx)
    ctx.state["dtype"] = dtype
    if dtype == torch.float32:
        reason = "fp32 requested" if ctx.config.dtype == "fp32" else f"no fast half precision on {ctx.device.type}"
        ctx.report.skipped("dtype", f"{reason}; everything stays fp32")
        return
    ctx.denoiser.to(dtype)
    done = [f"{ctx.family.denoiser} {NAMES[dtype]}"]
    vae = ctx.components["vae"]
    vae_dtype = dtype
    if ctx.config.vae_dtype == "fp32" or (ctx.config.vae_dtype == "safe" and dtype == torch.float16
                                          and getattr(vae.config, "force_upcast", False)):
        vae_dtype = torch.float32
    vae.to(vae_dtype)
    done.append(f"vae {NAMES[vae_dtype]}")
    for name, module in ctx.modules("text_encoder", "text_encoder_2"):
        te_dtype = dtype
        if ctx.config.text_encoder_dtype == "fp32" or (dtype == torch.float16 and "T5" in type(module).__name__):
            te_dtype = torch.float32
        module.to(te_dtype)
        done.append(f"{name} {NAMES[te_dtype]}")
    ctx.report.applied("dtype", ", ".join(done))
