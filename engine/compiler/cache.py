"""cache pass (lossy): skip denoiser work on steps whose output barely changes, through diffusers' cache hooks.

First-block cache compares the first block's residual with the previous step's and, under `cache_threshold`, reuses
the cached output of the remaining blocks. TaylorSeer and MagCache are offered where diffusers has them. The UNet
has no diffusers cache hooks, so SD 1.5 / SDXL report the pass as skipped.
"""

from __future__ import annotations

from typing import Any

from .context import PassContext


def _cache_config(kind: str, threshold: float) -> Any:
    import diffusers.hooks as hooks

    if kind == "first_block":
        return hooks.FirstBlockCacheConfig(threshold=threshold)
    if kind == "taylorseer":
        return hooks.TaylorSeerCacheConfig()
    if kind == "mag":
        return hooks.MagCacheConfig(threshold=threshold)
    raise ValueError(kind)


def apply_cache(ctx: PassContext) -> None:
    kind = ctx.config.cache
    if kind == "none":
        ctx.report.skipped("cache", "disabled in config")
        return
    model = ctx.denoiser
    if not hasattr(model, "enable_cache"):
        ctx.report.skipped("cache", f"{type(model).__name__} has no diffusers cache hooks")
        return
    kind = "first_block" if kind == "auto" else kind
    try:
        model.enable_cache(_cache_config(kind, ctx.config.cache_threshold))
    except Exception as e:  # a cache kind the installed diffusers cannot apply to this model
        ctx.report.skipped("cache", f"{kind}: {type(e).__name__}: {e}")
        return
    ctx.state["cache"] = kind
    ctx.report.applied("cache", f"{kind} cache on {type(model).__name__}, threshold {ctx.config.cache_threshold}")
