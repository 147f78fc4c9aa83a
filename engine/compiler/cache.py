"""cache pass (lossy): skip denoiser work on steps whose output barely changes, through diffusers' cache hooks.

First-block cache compares the first block's residual with the previous step's and, under the threshold, reuses
the cached output of the remaining blocks. TaylorSeer and MagCache are offered where diffusers has them. The UNet
has no diffusers cache hooks, so SD 1.5 / SDXL report the pass as skipped. The plan (engine/compiler/plan.py) raises
the threshold under fp8 quantization, and never combines the cache with CUDA graphs: the cached residuals are kept
across steps, and a CUDA-graph replay would overwrite them.
"""

from __future__ import annotations

from typing import Any

from .context import PassContext
from .plan import plan_of, replan


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
    plan = plan_of(ctx)
    model = ctx.denoiser
    has_hooks = hasattr(model, "enable_cache")
    if plan.cache is None:
        if ctx.config.cache != "none" and has_hooks and "no diffusers cache hooks" in plan.cache_note:
            plan = replan(ctx, step_cache_hooks=True)  # the family table was wrong about this model: it has hooks
        else:
            ctx.report.skipped("cache", plan.cache_note)
            return
    if not has_hooks:
        replan(ctx, step_cache_hooks=False)
        ctx.report.skipped("cache", f"{type(model).__name__} has no diffusers cache hooks")
        return
    assert plan.cache is not None
    try:
        model.enable_cache(_cache_config(plan.cache, plan.cache_threshold))
    except Exception as e:  # a cache kind the installed diffusers cannot apply to this model
        replan(ctx, step_cache_hooks=False)
        ctx.report.skipped("cache", f"{plan.cache}: {type(e).__name__}: {e}")
        return
    ctx.state["cache"] = plan.cache
    ctx.report.applied("cache", f"{plan.cache} cache on {type(model).__name__}, {plan.cache_note}")
