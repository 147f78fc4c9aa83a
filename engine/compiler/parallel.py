"""parallel pass: several devices for one request, selected from what this replica process sees.

The plan comes from `engine.scaleout.parallel.plan_parallel` (family rule × capabilities): CFG-parallel for UNets
(SD 1.5, SDXL) on two GPUs, applied here as a forward hook pair on the UNet and a copy of it on the second device
(`engine.scaleout.cfg_parallel`); FLUX context parallel, which needs a torch.distributed group (torchrun), and is
skipped with that reason otherwise. `parallel_devices` forces the two CFG-parallel devices (tests: ("cpu", "cpu"));
`parallel` = "context" | "ulysses" | "ring" forces context parallel over the process group's ranks (CPU ranks too).

Runs last: the copy is made of the final UNet (dtype, fused projections, kernels, LoRA slots, regionally compiled
blocks, which the copy compiles again). What it cannot compose with is a table of reasons, reported as skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..scaleout.parallel import (CONTEXT_REQUESTS, RULES, ParallelPlan, apply_parallel, detect_caps,
                                 plan_parallel)
from ..runtime.memory import estimate_activations, format_bytes
from .context import PassContext
from .plan import plan_of

NAME = "parallel"


@dataclass(frozen=True)
class _Blocker:
    applies: Callable[[PassContext], bool]
    reason: Callable[[PassContext], str]


def _memory_plan(ctx: PassContext) -> Any:
    return ctx.state.get("memory_plan")


# Why CFG-parallel cannot run on a model the earlier passes and the memory plan produced.
BLOCKERS: tuple[_Blocker, ...] = (
    _Blocker(lambda c: bool(getattr(_memory_plan(c), "offloads", False)),
             lambda c: f"the {_memory_plan(c).rung} memory plan offloads weights; CFG-parallel keeps the UNet "
                       "resident on each of its devices"),
    _Blocker(lambda c: bool(getattr(_memory_plan(c), "lossy", False)),
             lambda c: f"the {_memory_plan(c).rung} memory plan stores weights as {_memory_plan(c).storage} behind "
                       "casting hooks, which the UNet copy would not carry"),
    _Blocker(lambda c: c.family.denoiser in c.state.get("backend", {}),
             lambda c: f"the {c.family.denoiser} runs as an exported {c.state['backend'][c.family.denoiser]} graph"),
    _Blocker(lambda c: bool(c.state.get("compiled")) and plan_of(c).compile_scope == "whole",
             lambda c: "the whole UNet is compiled (static shapes, CUDA graphs), which would trace the split hooks "
                       "into its graph; regional compile composes (compile_config={'cuda_graphs': False})"),
)


# Why context parallel cannot run on what the earlier passes produced.
CONTEXT_BLOCKERS: tuple[_Blocker, ...] = (
    _Blocker(lambda c: c.state.get("cache") == "first_block",
             lambda c: "the first-block cache decides from each rank's own slice of the sequence whether to skip the "
                       "remaining blocks: ranks would disagree and wait on each other's all-to-all forever"),
    _Blocker(lambda c: c.family.denoiser in c.state.get("backend", {}),
             lambda c: f"the {c.family.denoiser} runs as an exported {c.state['backend'][c.family.denoiser]} graph, "
                       "which the context-parallel hooks never reach"),
)


def _uses_cfg(model: Any) -> bool:
    """Guidance-distilled (LCM) UNets take the scale as `timestep_cond` and never run a negative branch."""
    return getattr(getattr(model, "config", None), "time_cond_proj_dim", None) is None


def _heads(model: Any) -> int | None:
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


def _auto_cfg_blocker(device: torch.device, caps: Any) -> str | None:
    """Why automatic CFG-parallel does not apply to an engine on `device` though `caps` shows 2+ GPUs, or None. The
    pair is the engine's own CUDA device and another: an engine on the CPU (or MPS) has no GPU of its own to pair,
    and under torchrun every rank owns one GPU, so a copy on "the next" one would sit on a neighbour rank's."""
    if device.type != "cuda":
        return f"the engine runs on {device}; CFG-parallel pairs the engine's CUDA device with a second one"
    if caps.world_size > 1:
        return (f"torch.distributed has {caps.world_size} ranks (torchrun): each rank owns its GPU, so a UNet copy "
                "would land on a neighbour rank's; set parallel_devices to choose devices explicitly")
    return None


def _second_device(first: torch.device, count: int) -> torch.device:
    """The CUDA device after the engine's (wrapping around): never the engine's own when `count` >= 2."""
    index = first.index or 0
    return torch.device("cuda", (index + 1) % count)


def copy_need_bytes(plan: Any) -> int | None:
    """What the second device holds under a memory plan: the UNet as stored plus its activations for half the
    plan's CFG batch (one branch). None without a sized plan (nothing to check against)."""
    components = getattr(plan, "components", None)
    if not components or getattr(plan, "sizes", None) is None:
        return None
    unet = sum(c.bytes for c in components if c.role == "denoiser")
    half = estimate_activations(plan.sizes, dataclasses.replace(plan.request, cfg=False)).denoise
    return unet + half


def free_bytes(device: torch.device) -> int | None:
    """Memory a CUDA device can still give this process: free on the device plus what PyTorch's caching allocator
    holds unused there (None off CUDA: CPU memory is the host's, checked by the memory plan)."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def copy_blocker(plan: Any, device: torch.device) -> str | None:
    """Why the second device has no room for the UNet copy and one branch's activations, or None. The memory plan
    sizes the engine's device only; the copy's device is checked here, before anything is copied."""
    need = copy_need_bytes(plan)
    free = free_bytes(device) if need is not None else None
    if need is None or free is None or need <= free:
        return None
    return (f"{device} has {format_bytes(free)} free; the UNet copy and one branch's activations at "
            f"{plan.request.describe()} need {format_bytes(need)}")


def apply_parallel_plan(ctx: PassContext) -> None:
    if ctx.config.parallel == "off":
        ctx.report.skipped(NAME, "disabled in config (parallel='off')")
        return
    family, model = ctx.family.name, ctx.denoiser
    forced = ctx.config.parallel_devices
    caps = ctx.state.get("parallel_caps")  # tests put simulated capabilities here
    if forced is not None and ctx.config.parallel in CONTEXT_REQUESTS:
        ctx.report.skipped(NAME, f"parallel_devices forces CFG-parallel and parallel={ctx.config.parallel!r} context "
                           "parallel: choose one")
        return
    if forced is not None:
        rule = RULES.get(family)
        if rule is None or rule.kind != "cfg":
            ctx.report.skipped(NAME, f"parallel_devices forces CFG-parallel, which is for UNet families "
                               f"({', '.join(k for k, r in RULES.items() if r.kind == 'cfg')}), not {family}")
            return
        plan = ParallelPlan("cfg", 2, f"forced by parallel_devices={list(forced)}")
        devices = (torch.device(forced[0]), torch.device(forced[1]))
        if devices[0].type != ctx.device.type or (devices[0].index or 0) != (ctx.device.index or 0):
            ctx.report.skipped(NAME, f"parallel_devices[0] must be the engine's device ({ctx.device}), not "
                               f"{forced[0]}: the UNet stays where the pipeline runs")
            return
        if not _uses_cfg(model):
            ctx.report.skipped(NAME, "CFG-parallel needs classifier-free guidance; this UNet is guidance-distilled "
                               "(time_cond_proj_dim)")
            return
    else:
        caps = caps or detect_caps(_heads(model))
        plan = plan_parallel(family, caps, uses_cfg=_uses_cfg(model), request=ctx.config.parallel)
        if not plan.parallel:
            ctx.report.skipped(NAME, plan.reason)
            return
        if plan.kind != "cfg":  # FLUX context parallel: diffusers' enable_parallelism over a process group
            blocker = next((b for b in CONTEXT_BLOCKERS if b.applies(ctx)), None)
            if blocker is not None:
                ctx.report.skipped(NAME, f"{plan.kind}: {blocker.reason(ctx)} ({plan.reason})")
                return
            applied, reason = apply_parallel(model, plan, caps)
            (ctx.report.applied if applied else ctx.report.skipped)(NAME, f"{plan.kind}: {reason}")
            return
        why_not = _auto_cfg_blocker(ctx.device, caps)
        if why_not:
            ctx.report.skipped(NAME, f"cfg: {why_not} ({plan.reason})")
            return
        devices = (ctx.device, _second_device(ctx.device, caps.device_count))
    for blocker in BLOCKERS:
        if blocker.applies(ctx):
            ctx.report.skipped(NAME, f"cfg: {blocker.reason(ctx)} ({plan.reason})")
            return
    no_room = copy_blocker(_memory_plan(ctx), devices[1])
    if no_room:
        ctx.report.skipped(NAME, f"cfg: {no_room} ({plan.reason})")
        return
    from ..scaleout.cfg_parallel import attach_cfg_parallel

    compiled = plan_of(ctx).compile_kwargs() if ctx.state.get("compiled") else None
    try:
        report = ctx.report
        runner = attach_cfg_parallel(model, devices, compile_kwargs=compiled,
                                     on_fallback=lambda why: report.withdraw(NAME, f"cfg: {why}"))
    except torch.OutOfMemoryError as e:
        ctx.report.skipped(NAME, f"cfg: no room for the UNet copy on {devices[1]} ({str(e).splitlines()[0]})")
        return
    ctx.state["cfg_parallel"] = runner
    note = "; the copy's blocks compiled again" if compiled else ""
    ctx.report.applied(NAME, f"cfg: {type(model).__name__} runs each batch in halves on {devices[0]} and "
                       f"{devices[1]} (with guidance: one CFG branch each), concurrently; odd batches on "
                       f"{devices[0]}{note} ({plan.reason})")
