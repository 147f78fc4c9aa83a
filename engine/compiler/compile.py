"""compile and cuda_graphs passes: regional torch.compile of the denoiser's repeated blocks, and the VAE decoder.

Regional compilation (diffusers' `compile_repeated_blocks`) compiles one transformer block once and reuses the code
for every instance, so compile time does not grow with depth. Sizes are symbolic (`dynamic=True`): one graph serves
every resolution of a bucket (same batch size class), so changing resolution does not recompile. On CUDA,
"reduce-overhead" mode adds CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from .artifacts import use_compile_cache
from .context import PassContext


def _compile_kwargs(ctx: PassContext) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"fullgraph": ctx.config.compile_fullgraph, "dynamic": ctx.config.compile_dynamic}
    mode = ctx.state.get("compile_mode") or ctx.config.compile_mode
    if mode:
        kwargs["mode"] = mode
    return kwargs


def apply_cuda_graphs(ctx: PassContext) -> None:
    """Decides the compile mode, so it runs before `apply_compile`."""
    wanted = ctx.config.cuda_graphs
    if wanted is False:
        ctx.report.skipped("cuda_graphs", "disabled in config")
        return
    if ctx.device.type != "cuda":
        ctx.report.skipped("cuda_graphs", f"cuda graphs: device is {ctx.device.type}")
        return
    if not ctx.config.compile:
        ctx.report.skipped("cuda_graphs", "needs compile (CUDA graphs are captured by torch.compile's reduce-overhead)")
        return
    exported = ctx.state.get("backend", {})
    if ctx.family.denoiser in exported:
        ctx.report.skipped("cuda_graphs", f"the {ctx.family.denoiser} runs on {exported[ctx.family.denoiser]} "
                           "(exported graph)")
        return
    ctx.state["compile_mode"] = "reduce-overhead"
    ctx.report.applied("cuda_graphs", "torch.compile mode reduce-overhead (CUDA graph trees)")


def apply_compile(ctx: PassContext) -> None:
    """Compile what still runs in PyTorch: components the backend pass exported are left alone (and said so)."""
    if not ctx.config.compile:
        ctx.report.skipped("compile", "disabled in config")
        return
    exported: dict[str, str] = ctx.state.get("backend", {})
    denoiser_name = ctx.family.denoiser
    for name in (denoiser_name, "vae"):
        if name in exported and (name != "vae" or ctx.config.compile_vae):
            what = "vae decoder" if name == "vae" else name
            ctx.report.skipped("compile", f"{what}: runs on {exported[name]} (exported graph), not compiled")
    todo_denoiser = denoiser_name not in exported
    todo_vae = ctx.config.compile_vae and "vae" not in exported
    if not (todo_denoiser or todo_vae):
        return
    cache = use_compile_cache(ctx.device)
    kwargs = _compile_kwargs(ctx)
    done = []
    if todo_denoiser:
        model = ctx.denoiser
        blocks = getattr(model, "_repeated_blocks", None)
        denoiser_kwargs = kwargs
        if ctx.state.get("cache") and kwargs["fullgraph"]:
            # The step cache decides whether to skip the remaining blocks in a function diffusers marks
            # torch.compiler.disable: a deliberate graph break inside the first block.
            denoiser_kwargs = {**kwargs, "fullgraph": False}
        if blocks:
            model.compile_repeated_blocks(**denoiser_kwargs)
            done.append(f"{type(model).__name__} blocks {', '.join(blocks)}")
        else:
            model.compile(**denoiser_kwargs)
            done.append(f"{type(model).__name__} whole model")
        if denoiser_kwargs is not kwargs:
            done[-1] += f" with fullgraph=False (the {ctx.state['cache']} cache decides eagerly)"
    if todo_vae:
        ctx.components["vae"].decoder.compile(**{**kwargs, "fullgraph": False})
        done.append("vae decoder")
    ctx.state["compiled"] = True
    ctx.state["run_context"] = compiled_run_context
    ctx.report.applied("compile", f"{'; '.join(done)} (dynamic={kwargs['dynamic']}, fullgraph={kwargs['fullgraph']}"
                       f"{', mode=' + kwargs['mode'] if 'mode' in kwargs else ''}); cache {cache}")


def compiled_run_context() -> Any:
    """Scope for running compiled modules. Duck shaping off: dynamo would otherwise merge sizes that happen to be
    equal on the first call (e.g. 16 image tokens and a head dim of 16) and recompile when a new resolution
    separates them. Compilation is lazy, so this must wrap the calls, not the `compile()`."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


def compile_counters() -> dict[str, int]:
    """Dynamo/inductor counters worth asserting on: graphs compiled, FX cache hits and misses."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "calls_captured": counters["stats"]["calls_captured"],
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"]}


def reset_compile_counters() -> None:
    torch._dynamo.utils.counters.clear()
