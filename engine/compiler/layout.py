"""fuse_qkv and channels_last passes: lossless rewrites of the weights' layout.

fuse_qkv concatenates the query/key/value projections into one matmul (diffusers' `fuse_qkv_projections`);
channels_last stores conv activations NHWC, which cuDNN and oneDNN convolutions prefer.
"""

from __future__ import annotations

import torch

from .context import PassContext


def apply_fuse_qkv(ctx: PassContext) -> None:
    if not ctx.config.fuse_qkv:
        ctx.report.skipped("fuse_qkv", "disabled in config")
        return
    fused, unable = [], []
    for name, module in ctx.modules(ctx.family.denoiser, "vae"):
        if hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()
            fused.append(name)
        else:
            unable.append(name)
    if fused:
        ctx.report.applied("fuse_qkv", "fused q/k/v projections in " + ", ".join(fused))
    else:
        ctx.report.skipped("fuse_qkv", "no component supports fused projections: " + ", ".join(unable))


def _has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def apply_channels_last(ctx: PassContext) -> None:
    if not ctx.config.channels_last:
        ctx.report.skipped("channels_last", "disabled in config")
        return
    done, skipped = [], []
    for name, module in ctx.modules(ctx.family.denoiser, "vae"):
        if _has_conv(module):
            module.to(memory_format=torch.channels_last)
            done.append(name)
        else:
            skipped.append(f"{name} has no convolutions")
    if done:
        ctx.report.applied("channels_last", ", ".join(done) + (f" ({'; '.join(skipped)})" if skipped else ""))
    else:
        ctx.report.skipped("channels_last", "; ".join(skipped))
