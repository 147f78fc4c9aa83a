"""attention pass: switch the denoiser to the attention backend the plan chose (engine/compiler/plan.py: per
architecture, FA3/cuDNN first on Hopper, FA2 on Ampere and Ada, SageAttention only where lossy attention is allowed),
through diffusers' attention-backend API, with PyTorch's native SDPA as the fallback.

Only models whose attention goes through diffusers' dispatcher (the FLUX transformer) can switch backends; the
UNet's classic attention processors call PyTorch SDPA directly, which already selects flash / memory-efficient
kernels on CUDA, so for them the pass reports what runs instead of pretending to change it. The one exception is
xFormers, which diffusers offers the classic processors too (`enable_xformers_memory_efficient_attention`, its
XFormersAttnProcessor); not on fused q/k/v projections, which that processor does not read.
"""

from __future__ import annotations

import torch

from .context import PassContext
from .plan import backend_available, plan_of

__all__ = ["apply_attention", "backend_available"]


def _uses_dispatcher(model: torch.nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin

    return any(isinstance(m, AttentionModuleMixin) for m in model.modules())


def apply_attention(ctx: PassContext) -> None:
    plan = plan_of(ctx)
    if plan.attention is None:
        ctx.report.skipped("attention", "; ".join(plan.attention_passed) or "default attention requested")
        return
    model = ctx.denoiser
    if not _uses_dispatcher(model) and plan.attention == "xformers":
        _apply_classic_xformers(ctx, model)
        return
    if not _uses_dispatcher(model):
        ctx.report.skipped("attention", f"{type(model).__name__} calls PyTorch SDPA directly (AttnProcessor2_0), "
                                        "which picks its kernel per device; no backend to switch")
        return
    model.set_attention_backend(plan.attention)
    note = f"; passed over: {'; '.join(plan.attention_passed)}" if plan.attention_passed else ""
    ctx.report.applied("attention", f"{type(model).__name__} -> {plan.attention}{note}")


def _apply_classic_xformers(ctx: PassContext, model: torch.nn.Module) -> None:
    from .layout import is_fused

    name = type(model).__name__
    if is_fused(model):
        ctx.report.skipped("attention", f"xformers: {name}'s q/k/v projections are fused, which diffusers' "
                                        "XFormersAttnProcessor does not read; PyTorch SDPA runs")
        return
    model.enable_xformers_memory_efficient_attention()
    ctx.report.applied("attention", f"{name} -> xformers (diffusers' XFormersAttnProcessor)")
