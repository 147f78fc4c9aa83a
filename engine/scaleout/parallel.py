"""Several GPUs for one request, chosen from capabilities (data, not branches):

- FLUX (a DiT: long image-token sequences): diffusers' context parallelism, `ContextParallelConfig` +
  `transformer.enable_parallelism(config=...)`. Ulysses (all-to-all over heads) when the device count divides the
  attention heads and the devices share a fast interconnect (NVLink); ring attention (K/V passed around) otherwise.
- SDXL / SD1.5 (a UNet with classifier-free guidance): CFG-parallel on 2 devices of one process, the
  unconditional and the conditional half of every UNet batch each on its own GPU, concurrently, the noise
  predictions joined on the first (`engine/scaleout/cfg_parallel.py`, applied by the compiler pass `parallel`,
  engine/compiler/parallel.py). No process group: one replica that sees two GPUs.
- Anything else, one visible device, or no CUDA: a single-device plan, with the reason.

`plan_parallel` is pure (unit-tested on simulated capabilities); `apply_parallel` applies the context-parallel kinds,
which need an initialised `torch.distributed` process group of `plan.degree` ranks (torchrun), and says so otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParallelCaps:
    """What one replica sees: its devices and how they are linked."""

    device_type: str  # "cuda" | "cpu" | "mps"
    device_count: int
    nvlink: bool = False
    attention_heads: int | None = None  # of the model's transformer (Ulysses splits heads)
    distributed_ready: bool = False  # a torch.distributed group of `device_count` ranks exists


@dataclass(frozen=True)
class ParallelPlan:
    kind: str  # "single" | "context_ulysses" | "context_ring" | "cfg"
    degree: int
    reason: str
    config: dict[str, Any] = field(default_factory=dict)  # ContextParallelConfig kwargs for context kinds

    @property
    def parallel(self) -> bool:
        return self.kind != "single"


@dataclass(frozen=True)
class _FamilyRule:
    kind: str  # "context" or "cfg"
    max_degree: int | None  # None: every visible device


RULES: dict[str, _FamilyRule] = {
    "flux": _FamilyRule("context", None),
    "sdxl": _FamilyRule("cfg", 2),
    "sd15": _FamilyRule("cfg", 2),
}


def plan_parallel(family: str, caps: ParallelCaps, *, uses_cfg: bool = True) -> ParallelPlan:
    """The parallelism one request of `family` gets on `caps`, with why."""
    if caps.device_type != "cuda":
        return ParallelPlan("single", 1, f"multi-GPU needs CUDA devices (this replica has {caps.device_type})")
    if caps.device_count < 2:
        return ParallelPlan("single", 1, "one GPU visible to this replica")
    rule = RULES.get(family)
    if rule is None:
        return ParallelPlan("single", 1, f"no multi-GPU plan for the {family} family")
    degree = caps.device_count if rule.max_degree is None else min(rule.max_degree, caps.device_count)
    if rule.kind == "cfg":
        if not uses_cfg:
            return ParallelPlan("single", 1, "CFG-parallel needs classifier-free guidance (guidance off)")
        return ParallelPlan("cfg", 2, f"{family}: conditional and unconditional branches on 2 of "
                                      f"{caps.device_count} GPUs")
    heads = caps.attention_heads
    if caps.nvlink and heads and heads % degree == 0:
        return ParallelPlan("context_ulysses", degree, f"{family}: Ulysses over {degree} NVLinked GPUs "
                                                      f"({heads} heads split {heads // degree} per GPU)",
                            {"ulysses_degree": degree})
    why = "no NVLink" if not caps.nvlink else f"{heads} heads do not split over {degree} GPUs"
    return ParallelPlan("context_ring", degree, f"{family}: ring attention over {degree} GPUs ({why})",
                        {"ring_degree": degree})


def detect_caps(attention_heads: int | None = None) -> ParallelCaps:
    """This process's devices (NVLink from NVML peer access when torch can tell)."""
    import torch

    if not torch.cuda.is_available():
        return ParallelCaps("cpu", 0, attention_heads=attention_heads)
    count = torch.cuda.device_count()
    nvlink = count > 1 and all(torch.cuda.can_device_access_peer(0, i) for i in range(1, count))
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    return ParallelCaps("cuda", count, nvlink=nvlink, attention_heads=attention_heads, distributed_ready=ready)


def apply_parallel(transformer: Any, plan: ParallelPlan, caps: ParallelCaps) -> tuple[bool, str]:
    """Apply a context-parallel plan to a diffusers transformer; (applied, reason) as a compiler pass reports."""
    if plan.kind.startswith("context_"):
        if not caps.distributed_ready:
            return False, "context parallel needs torch.distributed initialised with one rank per GPU (torchrun)"
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(**plan.config))
        return True, plan.reason
    if plan.kind == "cfg":
        return False, "CFG-parallel runs in one process: the compiler's parallel pass hooks it onto the UNet"
    return False, plan.reason
