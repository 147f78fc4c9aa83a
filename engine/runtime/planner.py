"""The engine's side of memory planning: which plan a model gets before its weights are read, placing the loaded
components by that plan, stepping one rung down after an out-of-memory error, and whether several models fit.

The sizing and the ladder live in `runtime.memory`, the hooks in `runtime.placement`; this module only connects
them to model ids and loaded components.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from typing import Any, Callable, Mapping

import torch

from ..errors import InsufficientMemoryError, InvalidRequestError
from . import memory, placement

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError (torch.OutOfMemoryError), and the RuntimeErrors MPS and the CPU allocator raise."""
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


class Planner:
    """Plans and places the models of one engine (one device, one budget).

    A model is planned before its weights are read, from its configs (`memory.size_model`) in the dtypes it will be
    loaded in, for its default request size; a model that only its weights can describe (a single file) is sized
    once loaded. `memory_plan` forces a rung (a user who knows better, or a test of the offload hooks on the CPU,
    where the automatic choice is always resident).
    """

    def __init__(self, device: torch.device, max_memory: int | str | None = None, *, allow_lossy: bool = False,
                 memory_plan: str | None = None):
        if memory_plan is not None and memory_plan not in memory.RUNGS:
            raise InvalidRequestError("memory_plan", f"unknown plan {memory_plan!r}", ", ".join(memory.RUNGS))
        if memory_plan is not None and memory.RUNGS[memory_plan].lossy and not allow_lossy:
            raise InvalidRequestError("memory_plan", f"{memory_plan} stores weights lossily; pass allow_lossy_memory")
        self.device = device
        self.max_memory = memory.parse_memory(max_memory) if max_memory is not None else None
        self.allow_lossy = allow_lossy
        self.forced = memory_plan

    # -- choosing -------------------------------------------------------------------------------------------------
    def budget(self, extra_bytes: int = 0) -> memory.MemoryBudget:
        """The budget now; `extra_bytes` adds what evicting other models would free (a detected budget only)."""
        budget = memory.detect_budget(self.device, self.max_memory)
        return replace(budget, device_bytes=budget.device_bytes + extra_bytes) if extra_bytes else budget

    def _request(self, model: str, family: str) -> memory.PlanRequest:
        from ..families import get_family
        from ..registry import find_spec

        spec = find_spec(model)
        d = spec.defaults if spec is not None else None
        fam = get_family(family)
        width = (d.width if d and d.width else None) or (1024 if fam.max_size >= 4096 else 512)
        height = (d.height if d and d.height else None) or width
        cfg = None if d is None or d.guidance_scale is None else (fam.uses_negative_prompt and d.guidance_scale > 1)
        return memory.PlanRequest(width, height, 1, cfg=cfg, flash_attention=self.device.type == "cuda",
                                  max_sequence_length=d.max_sequence_length if d else None)

    def _plan(self, sizes: memory.ModelSizes, model: str, extra_bytes: int = 0) -> memory.MemoryPlan:
        request = self._request(model, sizes.family)
        if self.forced is not None:
            return memory.plan_at(sizes, request, self.budget(extra_bytes), self.forced)
        return memory.plan_memory(sizes, request, self.budget(extra_bytes), allow_lossy=self.allow_lossy)

    def plan_before_load(self, model: str, single_file_config: str | None, policy: Any, *,
                         extra_bytes: int = 0) -> memory.MemoryPlan | None:
        """The plan from configs alone, or None when the model's weights are needed to size it. `extra_bytes`:
        memory other loaded models would free if evicted (to compare with the plan the model gets beside them)."""
        if single_file_config is not None:
            return None
        sizes = memory.size_model(model, policy)
        return None if sizes is None else self._plan(sizes, model, extra_bytes)

    def plan_loaded(self, loaded: Any, policy: Any) -> memory.MemoryPlan:
        sizes = memory.sizes_from_components(loaded.key, loaded.family, loaded.components)
        return self._plan(sizes, loaded.key)

    def next_plan(self, plan: memory.MemoryPlan) -> memory.MemoryPlan | None:
        """One rung down after an out-of-memory error, with the budget as it is now; None at the bottom. Below a
        forced rung the ladder is walked in order (the forced mode is the caller's choice, also on the CPU)."""
        if self.forced is not None:
            below = memory.LADDER[memory.LADDER.index(memory.RUNGS[plan.rung]) + 1:]
            for rung in below:
                devices = memory.STORAGE_DEVICES.get(rung.storage)
                if (not rung.lossy or self.allow_lossy) and (not devices or self.device.type in devices):
                    return memory.plan_at(plan.sizes, plan.request, self.budget(), rung.name)
            return None
        try:
            return memory.next_plan(plan, budget=self.budget() if self.max_memory is None else None)
        except InsufficientMemoryError:
            return None

    def fits_beside(self, plan: memory.MemoryPlan, others: list[memory.MemoryPlan]) -> bool:
        """Whether `plan`'s peak fits next to what the other loaded models keep on the device. A detected budget
        already excludes them (it is the free memory now), so only an explicit `max_memory` is shared out here;
        host RAM is checked either way."""
        if self.max_memory is not None and sum(o.resident_bytes for o in others) + plan.peak_bytes > self.max_memory:
            return False
        available = memory.detect_budget(self.device).host_bytes if self.device.type != "cpu" else None
        return available is None or plan.host_bytes <= available

    def for_request(self, plan: memory.MemoryPlan, width: int, height: int, num_images: int, cfg: bool,
                    adjuncts: Mapping[str, torch.nn.Module] | None = None) -> tuple[memory.MemoryPlan, str | None]:
        """The plan for this request: its size's VAE options (tiling/slicing are per call) and, sized beside the
        model's components, the request's ControlNets / image encoder (`adjuncts`, placed by `place_adjuncts`); a
        note when the rung is expected not to fit it (the job still runs: an actual out-of-memory error steps
        down)."""
        request = memory.PlanRequest(width, height, num_images, cfg=cfg, flash_attention=plan.request.flash_attention,
                                     max_sequence_length=plan.request.max_sequence_length)
        sizes = memory.with_adjuncts(plan.sizes, plan.sizes.family, adjuncts or {})
        try:
            return memory.replan_request(plan, request, sizes), None
        except InsufficientMemoryError as e:
            return replace(plan, vae_tiling=True, vae_slicing=num_images > 1, request=request, sizes=sizes), str(e)

    @staticmethod
    def load_policy(policy: Any, plan: memory.MemoryPlan) -> Any:
        """The loaders' dtype policy for `plan`: under NF4 storage, the denoiser and text encoders are loaded as
        bitsandbytes NF4 (CUDA only; the ladder offers NF4 only where bitsandbytes is installed)."""
        if plan.storage != "nf4":
            return policy
        names = tuple(c.name for c in plan.components if c.role in memory.LOSSY_ROLES)
        return replace(policy, nf4_components=names)

    # -- placing --------------------------------------------------------------------------------------------------
    def places_before_passes(self, plan: memory.MemoryPlan) -> bool:
        """Resident weights go to the device before the compiler passes (which then rewrite them there, as they
        always did); offload hooks and lossy storage wrap the final modules, after the weight rewrites."""
        return not plan.offloads and not plan.lossy

    def place(self, components: dict[str, Any], family: Any, plan: memory.MemoryPlan) -> list[str]:
        return placement.apply_memory_plan(components, family, plan, self.device)

    def place_adjuncts(self, components: dict[str, Any], plan: memory.MemoryPlan,
                       adjuncts: Mapping[str, torch.nn.Module]) -> list[str]:
        """A request's ControlNets / image encoder placed as `plan` (from `for_request`) places the model."""
        return placement.place_adjuncts(components, adjuncts, plan, self.device) if adjuncts else []

    def adjunct_home(self, plan: memory.MemoryPlan | None) -> torch.device:
        """Where to load a request's ControlNet / image encoder for a model under `plan`."""
        return placement.adjunct_home(plan, self.device)

    def set_vae_options(self, components: dict[str, Any], plan: memory.MemoryPlan) -> None:
        vae = components.get("vae")
        if vae is not None:
            placement.apply_vae_options(vae, plan.vae_tiling, plan.vae_slicing)

    def encode_scope(self, components: dict[str, Any], family: Any, plan: memory.MemoryPlan
                     ) -> Callable[[], Any] | None:
        return placement.encode_scope(components, plan)

    def describe(self, plan: memory.MemoryPlan) -> list[str]:
        return plan.describe()

    def release(self, *, keep_cuda_graphs: bool = True) -> None:
        """Free dropped models' memory. Compiled functions outlive their modules (dynamo keeps them on the model
        class's module), and with them the CUDA-graph trees' private memory pool: once no loaded model uses CUDA
        graphs, the trees are reset so that pool is returned too."""
        if self.device.type == "cuda" and not keep_cuda_graphs:
            try:
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
            except Exception as e:  # an inductor without cudagraph trees: nothing was pooled
                log.debug("cudagraph trees not reset: %s", e)
        free_device_memory(self.device)

    @staticmethod
    def name(plan: memory.MemoryPlan) -> str:
        return plan.rung


def add_memory_arguments(parser: Any) -> None:
    """The memory flags `engine generate` and `engine serve` share (see `engine_memory_kwargs`)."""
    parser.add_argument("--max-memory", help="device memory budget, e.g. 24GB or 12GiB (default: the free memory)")
    parser.add_argument("--memory-plan", choices=list(memory.RUNGS),
                        help="force one rung of the memory ladder (default: the richest that fits; see `engine plan`)")
    parser.add_argument("--allow-lossy-memory", action="store_true",
                        help="allow fp8/int8/nf4 weight storage when nothing lossless fits")
    parser.add_argument("--max-loaded-models", type=int, help="evict the least recently used model beyond this many")


def engine_memory_kwargs(args: Any) -> dict[str, Any]:
    return {"max_memory": args.max_memory, "memory_plan": args.memory_plan,
            "allow_lossy_memory": args.allow_lossy_memory, "max_loaded_models": args.max_loaded_models}
