"""Placing loaded components by a `MemoryPlan`: only the choosing is ours, the moving is diffusers'/accelerate's.

- storage (lossy rungs, before placement, as diffusers documents for layerwise casting + group offload):
  `ModelMixin.enable_layerwise_casting` / `diffusers.hooks.apply_layerwise_casting` (fp8 storage, compute in the
  component's dtype), torchao `quantize_(Int8WeightOnlyConfig())`; NF4 must come from the loader
  (bitsandbytes quantizes while loading), here it is only checked;
- placement: `.to(device)` (resident); accelerate `cpu_offload_with_hook` chained text encoders -> denoiser -> VAE as
  diffusers' `enable_model_cpu_offload` chains them, grouped by the plan and closed into a cycle (the first group's
  hook sends the last one back, instead of diffusers' end-of-call `maybe_free_model_hooks`); diffusers
  `apply_group_offloading(offload_type="block_level")` with a CUDA stream and pinned memory on CUDA only;
- the VAE's `enable_tiling()` / `enable_slicing()`;
- a request's ControlNets and IP-Adapter image encoder (`place_adjuncts`), per job, the way the plan places the
  component they run with: resident on the device, in the denoiser's swap group (ControlNets) or the last text
  encoder's (image encoder), or block-level group offload of their own.

Components arrive on the host in their compute dtype. `reset_placement` undoes hooks before re-planning; it
cannot undo lossy storage (diffusers refuses to un-cast layerwise casting: the weights are already rounded).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from accelerate.hooks import UserCpuOffloadHook

from ..errors import ModelLoadError
from ..families import FamilySpec
from .memory import (
    LOSSY_ROLES,
    RUNGS,
    MemoryPlan,
    component_role,
    group_block_modules,
    is_prequantized,
    layerwise_skip_patterns,
    swap_groups,
)

TEXT_ENCODER_PREFIX = "text_encoder"


def _modules(components: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}


def _compute_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# ------------------------------------------------------------------------------------------------------- storage
def _has_diffusers_hook(module: torch.nn.Module, name: str) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(name) is not None
               for m in module.modules())


def apply_fp8_storage(module: torch.nn.Module) -> str:
    """fp8 (e4m3) storage, upcast per layer to the module's dtype for compute (diffusers layerwise casting)."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_layerwise_casting

    if _has_diffusers_hook(module, "layerwise_casting"):
        return "already fp8"
    compute = _compute_dtype(module)
    if isinstance(module, ModelMixin):
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    else:  # transformers encoders: the same hook, with the skip patterns ModelMixin would add
        apply_layerwise_casting(module, torch.float8_e4m3fn, compute,
                                skip_modules_pattern=layerwise_skip_patterns(module))
    return f"fp8 storage, {str(compute).removeprefix('torch.')} compute"


def _quantizable(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features >= 16 and module.out_features >= 16


def apply_int8_storage(module: torch.nn.Module) -> str:
    """torchao int8 weight-only on the Linear layers (the same filter as the compiler's quant pass)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.utils import TorchAOBaseTensor

    if any(isinstance(getattr(m, "weight", None), TorchAOBaseTensor) for m in module.modules()):
        return "already quantized"
    count = sum(1 for fqn, m in module.named_modules() if _quantizable(m, fqn))
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=_quantizable)
    return f"int8 weight-only ({count} linear layers)"


def check_nf4_storage(module: torch.nn.Module) -> str:
    """NF4 weights are made by bitsandbytes while loading (`BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")`); a plan cannot produce them afterwards, so a component without them is an error."""
    count = sum(1 for m in module.modules() if type(m).__name__ == "Linear4bit")
    if not count:
        raise ModelLoadError(f"{type(module).__name__}: the memory plan stores NF4 weights, which bitsandbytes makes "
                             "at load time; load with a BitsAndBytesConfig (nf4) or choose another plan")
    return f"nf4 ({count} 4-bit linear layers)"


STORAGE_APPLIERS: dict[str, Callable[[torch.nn.Module], str]] = {
    "fp8": apply_fp8_storage,
    "int8": apply_int8_storage,
    "nf4": check_nf4_storage,
}


# ----------------------------------------------------------------------------------------------------- placement
def _place_resident(modules: dict[str, torch.nn.Module], plan: MemoryPlan, device: torch.device) -> list[str]:
    for module in modules.values():
        module.to(device)
    return [f"placement resident: {', '.join(modules)} on {device}"]


def _on_host(module: torch.nn.Module) -> bool:
    return next((p.device.type == "cpu" for p in module.parameters()), True)


class GroupOffloadHandle(UserCpuOffloadHook):
    """One accelerate offload handle for a group of modules: `prev_module_hook` takes a single
    `UserCpuOffloadHook`, whose `model` accelerate checks for being on the host before calling `offload()`; here
    `model` is a member still on the device (the group's largest when none is), and `offload()` sends every member
    back, a request's ControlNets / image encoder (`adjuncts`, held weakly) included."""

    def __init__(self, handles: list[UserCpuOffloadHook]):
        largest = max(handles, key=lambda h: sum(p.numel() for p in h.model.parameters()))
        self.handles = handles
        self.adjuncts: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        super().__init__(largest.model, largest.hook)

    def members(self) -> list[torch.nn.Module]:
        return [h.model for h in self.handles] + list(self.adjuncts)

    @property
    def model(self) -> torch.nn.Module:
        return next((m for m in self.members() if not _on_host(m)), self._largest)

    @model.setter
    def model(self, module: torch.nn.Module) -> None:
        self._largest = module

    def offload(self) -> None:
        for handle in self.handles:
            handle.offload()
        for module in list(self.adjuncts):
            module.to("cpu")


class OtherGroupsHandle(GroupOffloadHandle):
    """What a swap group's first hook offloads: every other group (not only the one before it: with a prompt-cache
    hit the text encoders never run, and the VAE of the last job would otherwise stay beside the denoiser)."""

    def __init__(self, groups: list[GroupOffloadHandle]):
        self.groups = groups
        self.adjuncts = weakref.WeakSet()
        self.handles = [h for g in groups for h in g.handles]
        UserCpuOffloadHook.__init__(self, groups[0].model, groups[0].hook)

    def members(self) -> list[torch.nn.Module]:
        return [m for g in self.groups for m in g.members()]

    def offload(self) -> None:
        for group in self.groups:
            group.offload()


# Swap placement of each placed component, kept on the module itself: (its group's handle, the handle its group's
# first hook offloads). The handles reference the module back: a cycle the garbage collector frees with the model
# (a module-level table keyed weakly by the module would pin it through its own values).
SWAP_GROUP_ATTR = "_engine_swap_group"


def swap_group(module: torch.nn.Module) -> "tuple[GroupOffloadHandle, OtherGroupsHandle | None] | None":
    """The swap group `module` was placed in (its handle, the handle of the other groups), or None."""
    return module.__dict__.get(SWAP_GROUP_ATTR)


def _place_swap(modules: dict[str, torch.nn.Module], plan: MemoryPlan, device: torch.device) -> list[str]:
    from accelerate import cpu_offload_with_hook

    groups = [[c.name for c in g if c.name in modules] for g in swap_groups(RUNGS[plan.rung].placement, plan.sizes)]
    groups = [g for g in groups if g]
    extra = [n for n in modules if not any(n in g for g in groups)]  # unsized components ride with the last group
    if extra:
        if groups:
            groups[-1] += extra
        else:
            groups.append(extra)
    handles = [[cpu_offload_with_hook(modules[name], device)[1] for name in group] for group in groups]
    group_handles = [GroupOffloadHandle(h) for h in handles]
    for i, (names, group) in enumerate(zip(groups, handles)):
        others = OtherGroupsHandle(group_handles[:i] + group_handles[i + 1:]) if len(groups) > 1 else None
        group[0].hook.prev_module_hook = others
        for name in names:
            modules[name].__dict__[SWAP_GROUP_ATTR] = (group_handles[i], others)
    order = " -> ".join("+".join(g) for g in groups)
    return [f"placement {plan.rung}: accelerate cpu_offload_with_hook onto {device}, groups {order} (each group's "
            "first forward sends the other groups back to the host)"]


def _group_offload(module: torch.nn.Module, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading

    stream = device.type == "cuda"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, non_blocking=stream,
                           use_stream=stream, block_modules=list(group_block_modules(module) or ()) or None)


def _place_group_offload(modules: dict[str, torch.nn.Module], plan: MemoryPlan, device: torch.device) -> list[str]:
    stream = device.type == "cuda"
    for module in modules.values():
        _group_offload(module, device)
    how = "CUDA stream prefetch from pinned memory" if stream else "no stream (not CUDA), pageable memory"
    return [f"placement group_offload: diffusers block-level group offload onto {device} for {', '.join(modules)} "
            f"({how})"]


PLACERS: dict[str, Callable[[dict[str, torch.nn.Module], MemoryPlan, torch.device], list[str]]] = {
    "resident": _place_resident,
    "swap": _place_swap,
    "group_offload": _place_group_offload,
}


def apply_vae_options(vae: Any, tiling: bool, slicing: bool) -> list[str]:
    """Tiled / sliced decode through the VAE's own switches (per request: they cost nothing to toggle)."""
    notes = []
    for flag, on, name in ((tiling, "enable_tiling", "tiling"), (slicing, "enable_slicing", "slicing")):
        method = on if flag else "dis" + on[2:]
        if hasattr(vae, method):
            getattr(vae, method)()
            if flag:
                notes.append(f"vae {name} on")
        elif flag:
            notes.append(f"vae {name} skipped: {type(vae).__name__} has no {on}()")
    return notes


def apply_memory_plan(components: Mapping[str, Any], family: FamilySpec, plan: MemoryPlan,
                      device: torch.device | str) -> list[str]:
    """Apply `plan` to host-resident components: lossy storage first, then placement, then the VAE switches.
    Returns notes for the optimization report. Hooks of an earlier plan are removed first."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # accelerate compares devices with their index
    modules = _modules(components)
    notes = reset_placement(components, quiet=True)
    if plan.lossy:
        applier = STORAGE_APPLIERS[plan.storage]
        done = [f"{name} {applier(m) if not is_prequantized(m) else 'kept as loaded (pre-quantized)'}"
                for name, m in modules.items() if component_role(name, family) in LOSSY_ROLES]
        notes.append(f"storage {plan.storage}: " + "; ".join(done))
    notes += PLACERS[plan.placement](modules, plan, device)
    vae = components.get("vae")
    if vae is not None:
        notes += apply_vae_options(vae, plan.vae_tiling, plan.vae_slicing)
    return notes


def reset_placement(components: Mapping[str, Any], *, quiet: bool = False, to_host: bool = True) -> list[str]:
    """Remove offload hooks (accelerate's and diffusers' group offload) and bring every module back to the host
    (`to_host=False`: leave them where they are, for a model being dropped: copying a resident 12 B model to the host
    only to free it costs seconds and, on a small host, its RAM). Adjuncts (ControlNets, image encoder) that joined
    the components' swap groups lose their hooks and go to the host (they stay cached): the hooks chain to the
    groups, and a cached adjunct would otherwise keep a dropped model alive (the next job places them anew).
    Lossy storage stays: once rounded, weights do not come back (`memory.needs_reload` says when to reload)."""
    notes = []
    for name, module in _modules(components).items():
        group = module.__dict__.pop(SWAP_GROUP_ATTR, None)
        for adjunct in list(group[0].adjuncts) if group is not None else ():
            _remove_hooks(adjunct)
            _ADJUNCTS.pop(adjunct, None)
            group[0].adjuncts.discard(adjunct)
            adjunct.to("cpu")
        removed = _remove_hooks(module)
        if to_host:
            module.to("cpu")
        if removed:
            notes.append(f"{name}: removed {', '.join(removed)} hooks")
    return [] if quiet else notes


def _remove_hooks(module: torch.nn.Module) -> list[str]:
    """Take accelerate's and diffusers' group-offload hooks off `module`; what was removed."""
    from accelerate.hooks import remove_hook_from_module
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        _is_group_offload_enabled,
    )

    removed = []
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        remove_hook_from_module(module, recurse=True)
        removed.append("accelerate offload")
    if _is_group_offload_enabled(module):
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for hook in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(hook, recurse=True)
        removed.append("group offload")
    return removed


# ------------------------------------------------------------------------------------------------------ adjuncts
# How each adjunct module is placed now: (placement kind, device, a weak reference to the swap group handle it joined
# or None). A dead reference equals no live one, so a group placed anew (after a LoRA change) is never mistaken for
# the old one.
_ADJUNCTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, str, weakref.ref | None]]" = \
    weakref.WeakKeyDictionary()


def adjunct_home(plan: MemoryPlan | None, device: torch.device | str) -> torch.device:
    """Where a request's ControlNet / image encoder is loaded: the device under a resident plan, else the host (the
    plan's hooks bring it to the device when it runs)."""
    return torch.device(device) if plan is None or not plan.offloads else torch.device("cpu")


def _swap_group_of(name: str, components: Mapping[str, Any], plan: MemoryPlan
                   ) -> tuple[GroupOffloadHandle, OtherGroupsHandle | None] | None:
    """The swap group `plan.sizes` puts adjunct `name` in, found through a placed component of that group."""
    for group in swap_groups(RUNGS[plan.rung].placement, plan.sizes):
        if any(c.name == name for c in group):
            for c in group:
                module = components.get(c.name)
                placed = swap_group(module) if isinstance(module, torch.nn.Module) else None
                if placed is not None:
                    return placed
    return None


def place_adjuncts(components: Mapping[str, Any], adjuncts: Mapping[str, torch.nn.Module], plan: MemoryPlan,
                   device: torch.device | str) -> list[str]:
    """Place a request's ControlNets ("controlnet", "controlnet_1", ...) and IP-Adapter image encoder
    ("image_encoder") as `plan` places the model (`plan.sizes` from `memory.with_adjuncts` says which swap group
    each joins): resident: on the device; swap: an accelerate hook whose first forward sends the other groups back,
    and a member of its group (sent back with it); group offload: its own block-level group offload. A module
    already placed this way is left alone (the next job with the same ControlNet moves nothing). Lossy storage is
    not applied to them: they stay in their compute dtype. Returns notes of what changed."""
    from accelerate import cpu_offload_with_hook

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    notes = []
    for name, module in adjuncts.items():
        group = _swap_group_of(name, components, plan) if plan.placement == "swap" else None
        if plan.placement == "swap" and group is None:
            group = _swap_group_of(plan.sizes.by_role("denoiser", "upsampler")[0].name, components, plan)
        key = (plan.placement, str(device), weakref.ref(group[0]) if group else None)
        previous = _ADJUNCTS.get(module)
        if previous == key:
            if plan.placement == "resident":
                module.to(device)  # a caller's module moved since: back (a no-op when it is there)
            continue
        _remove_hooks(module)
        old_group = previous[2]() if previous is not None and previous[2] is not None else None
        if old_group is not None:
            old_group.adjuncts.discard(module)  # it no longer swaps with that group
        if plan.placement == "resident" or (plan.placement == "swap" and group is None):
            module.to(device)
            how = f"on {device}"
        elif plan.placement == "swap":
            assert group is not None
            module.to("cpu")
            cpu_offload_with_hook(module, device, prev_module_hook=group[1])
            group[0].adjuncts.add(module)
            how = f"swapped with {'+'.join(type(m).__name__ for m in group[0].members() if m is not module)}"
        else:
            module.to("cpu")
            _group_offload(module, device)
            how = f"block-level group offload onto {device}"
        _ADJUNCTS[module] = key
        notes.append(f"{name} ({type(module).__name__}): {how}")
    return notes


def offload_text_encoders(components: Mapping[str, Any]) -> list[str]:
    """Send swapped text encoders back to the host now (after encoding; their next forward brings them back).
    Resident and group-offloaded encoders are left alone: the first stay by design, the second offload themselves."""
    from accelerate.hooks import CpuOffload

    moved = []
    for name, module in _modules(components).items():
        if name.startswith(TEXT_ENCODER_PREFIX) and isinstance(getattr(module, "_hf_hook", None), CpuOffload):
            module.to("cpu")
            moved.append(name)
    return moved


def encode_scope(components: Mapping[str, Any], plan: MemoryPlan) -> Callable[[], ContextManager[None]] | None:
    """For the pipeline's `encode_scope`: under swap placements, text encoders go back to the host as soon as the
    prompt is encoded (so the denoiser's onload never meets them on the device). None where nothing is to do."""
    if plan.placement != "swap":
        return None

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        try:
            yield
        finally:
            offload_text_encoders(components)

    return scope
