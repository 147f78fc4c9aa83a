"""The engine's side of memory planning: which plan a model gets before its weights are read, placing the loaded
components by that plan, stepping one rung down after an out-of-memory error, and whether several models fit.

The sizing and the ladder live in `runtime.memory`, the hooks in `runtime.placement`; this module only connects
them to model ids and loaded components.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Callable

import torch

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
    """Plans and places models for one engine (device + budget). Until a model can be sized, it is resident."""

    def __init__(self, device: torch.device, max_memory: int | str | None = None, *, allow_lossy: bool = False):
        self.device = device
        self.max_memory = max_memory
        self.allow_lossy = allow_lossy

    def plan_before_load(self, model: str, single_file_config: str | None, policy: Any) -> Any:
        return None

    def plan_loaded(self, loaded: Any, policy: Any) -> Any:
        return "resident"

    def places_before_passes(self, plan: Any) -> bool:
        return True

    def place(self, components: dict[str, Any], family: Any, plan: Any) -> list[str]:
        for value in components.values():
            if isinstance(value, torch.nn.Module):
                value.to(self.device)
        return []

    def describe(self, plan: Any) -> list[str]:
        return [f"plan {self.name(plan)}"]

    def encode_scope(self, components: dict[str, Any], family: Any, plan: Any) -> Callable[[], Any] | None:
        return None

    def fits_beside(self, plan: Any, others: list[Any]) -> bool:
        return True

    def release(self) -> None:
        free_device_memory(self.device)

    def next_plan(self, plan: Any) -> Any:
        return None

    def name(self, plan: Any) -> str:
        return str(plan)
