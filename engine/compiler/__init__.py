"""The pipeline compiler: `optimize(...)` applies one small pass per optimization and reports each one."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..families import FamilySpec
from .attention import apply_attention
from .backend import apply_backend
from .cache import apply_cache
from .compile import apply_compile, apply_cuda_graphs
from .config import CompileConfig, config_for_level, level_names, resolve_config
from .context import PassContext
from .dtype import apply_dtype
from .kernels import apply_kernels_pass
from .layout import apply_channels_last, apply_fuse_qkv
from .lora_slots import apply_lora_slots
from .parallel import apply_parallel_plan
from .plan_rules import fit_config_to_plan
from .prompt_cache import PromptCache, apply_prompt_cache
from .quant import apply_quant
from .report import OptimizationReport, PassResult

# Order matters: dtype before everything; fusing before quantizing; the kernels after every pass that rewrites
# projections (the LoRA slots may unfuse q/k/v) and before placement, export and compile; the export backend after
# every pass that changes the modules it exports (and it reports a quantized or cached denoiser as staying on torch);
# compile after them (it captures the final modules, and leaves the exported ones alone); the parallel pass last (its
# UNet copy on a second device is made of the final UNet).
PASSES: list[Callable[[PassContext], None]] = [
    apply_dtype,
    apply_fuse_qkv,
    apply_channels_last,
    apply_attention,
    apply_quant,
    apply_cache,
    apply_lora_slots,
    apply_kernels_pass,
    apply_backend,
    apply_cuda_graphs,
    apply_compile,
    apply_prompt_cache,
    apply_parallel_plan,
]
# With an offloading memory plan, components are placed right before the first of these passes.
PLACEMENT_BEFORE = (apply_backend, apply_cuda_graphs, apply_compile)


def optimize(components: dict[str, Any], family: FamilySpec, device: torch.device, config: CompileConfig, *,
             state: dict[str, Any] | None = None,
             place: Callable[[dict[str, Any]], None] | None = None) -> tuple[OptimizationReport, dict[str, Any]]:
    """Apply every pass in place; return the report and the decisions the pipeline needs (e.g. its prompt cache).

    `state` seeds what the passes read (the dtype policy the weights were loaded with, the memory plan). `place`, if
    given, puts the components on the device (offload hooks) after the passes that rewrite weights and before those
    that capture the final modules (export, compile): hooks must wrap the modules that will actually run.
    """
    config, dropped = fit_config_to_plan(config, (state or {}).get("memory_plan"))
    report = OptimizationReport(config_hash=config.compute_hash(), device=str(device))
    for name, reason in dropped:
        report.skipped(name, reason)
    ctx = PassContext(components=components, family=family, device=device, config=config, report=report,
                      state=dict(state or {}))
    with _quiet_diffusers():
        for apply in PASSES:
            if place is not None and apply in PLACEMENT_BEFORE:
                place(components)
                place = None
            apply(ctx)
        if place is not None:
            place(components)
    return report, ctx.state


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every `.to(dtype)` and backend switch; the report already says what happened."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.ERROR)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


__all__ = ["CompileConfig", "OptimizationReport", "PassResult", "PromptCache", "config_for_level", "level_names",
           "optimize", "resolve_config"]
