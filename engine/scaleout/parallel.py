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
which need an initialised `torch.distributed` process group of `plan.degree` ranks (torchrun), and says so otherwise.

`CompileConfig.parallel` = "context" | "ulysses" | "ring" forces context parallelism over every rank of the process
group, also on CPU processes (gloo): that is how it is tested without GPUs (tests/test_context_parallel.py). On CPU
only Ulysses runs (`CONTEXT_KINDS`): ring attention merges partial results by their log-sum-exp, which diffusers'
native SDPA backend does not return (`attention_dispatch._native_attention_forward_op` raises on `return_lse=True`)
and every backend that does return it is a CUDA kernel (`_native_flash`: aten `_scaled_dot_product_flash_attention`,
`_native_cudnn`, `flash`, `sage`). diffusers' Flux cp plan splits the image and text tokens; the ControlNet residuals
(lists of any length) are split by a pre-hook of ours (`CONTROLNET_SAMPLES`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, get_args

ContextRequest = Literal["context", "ulysses", "ring"]  # values of CompileConfig.parallel that force context parallel
CONTEXT_REQUESTS: tuple[str, ...] = get_args(ContextRequest)


@dataclass(frozen=True)
class ParallelCaps:
    """What one replica sees: its devices and how they are linked."""

    device_type: str  # "cuda" | "cpu" | "mps"
    device_count: int
    nvlink: bool = False
    attention_heads: int | None = None  # of the model's transformer (Ulysses splits heads)
    distributed_ready: bool = False  # a torch.distributed group is initialised (torchrun)
    world_size: int = 1  # ranks of the initialised torch.distributed group (1: none)


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


# Context-parallel kinds each device type runs with diffusers' stock attention backends (0.42.1), and why not.
CONTEXT_KINDS: dict[str, tuple[str, ...]] = {
    "cuda": ("context_ulysses", "context_ring"),
    "cpu": ("context_ulysses",),
}
MISSING_KIND_REASONS: dict[str, str] = {
    "context_ring": "ring attention needs the attention log-sum-exp: diffusers' native SDPA backend does not return it "
                    "(attention_dispatch._native_attention_forward_op raises on return_lse=True) and the backends that "
                    "do (_native_flash, _native_cudnn, flash, sage) are CUDA kernels",
    "context_ulysses": "Ulysses all-to-all has no diffusers attention backend on this device type",
}


def _context_plan(family: str, caps: ParallelCaps, request: str) -> ParallelPlan:
    """`parallel` = "context" | "ulysses" | "ring": context parallelism over every rank of the process group."""
    rule = RULES.get(family)
    if rule is None or rule.kind != "context":
        dits = ", ".join(k for k, r in RULES.items() if r.kind == "context")
        return ParallelPlan("single", 1, f"parallel={request!r} is context parallelism, for DiT families ({dits}), "
                                         f"not {family}")
    degree = caps.world_size
    if degree < 2:
        return ParallelPlan("single", 1, f"parallel={request!r} needs a torch.distributed process group of 2 or more "
                                         "ranks (torchrun --nproc-per-node N); this process has none")
    heads = caps.attention_heads
    splits = bool(heads) and heads % degree == 0
    supported = CONTEXT_KINDS.get(caps.device_type, ())
    if request == "context":  # as auto would choose: Ulysses over NVLink (or where ring cannot run), ring otherwise
        ulysses_first = caps.nvlink or "context_ring" not in supported
        kind = "context_ulysses" if splits and ulysses_first else "context_ring"
    else:
        kind = f"context_{request}"
    if kind == "context_ulysses" and not splits:
        return ParallelPlan("single", 1, f"Ulysses splits attention heads over ranks: {heads} heads do not split "
                                         f"over {degree} ranks")
    if kind not in supported:
        return ParallelPlan("single", 1, f"{kind} does not run on {caps.device_type}: {MISSING_KIND_REASONS[kind]}")
    where = f"{degree} {caps.device_type} ranks"
    if kind == "context_ulysses":
        return ParallelPlan(kind, degree, f"{family}: Ulysses over {where} ({heads} heads split {heads // degree} "
                                          f"per rank; forced by parallel={request!r})", {"ulysses_degree": degree})
    return ParallelPlan(kind, degree, f"{family}: ring attention over {where} (forced by parallel={request!r})",
                        {"ring_degree": degree})


def plan_parallel(family: str, caps: ParallelCaps, *, uses_cfg: bool = True, request: str = "auto") -> ParallelPlan:
    """The parallelism one request of `family` gets on `caps`, with why. `request` is `CompileConfig.parallel`
    ("auto", or a forced context kind from `CONTEXT_REQUESTS`)."""
    if request in CONTEXT_REQUESTS:
        return _context_plan(family, caps, request)
    if caps.device_type != "cuda":
        return ParallelPlan("single", 1, f"multi-GPU needs CUDA devices (this replica has {caps.device_type})")
    if caps.device_count < 2:
        return ParallelPlan("single", 1, "one GPU visible to this replica")
    rule = RULES.get(family)
    if rule is None:
        return ParallelPlan("single", 1, f"no multi-GPU plan for the {family} family")
    count = caps.world_size if rule.kind == "context" and caps.world_size > 1 else caps.device_count
    degree = count if rule.max_degree is None else min(rule.max_degree, count)
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

    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if ready else 1
    if not torch.cuda.is_available():
        return ParallelCaps("cpu", 0, attention_heads=attention_heads, distributed_ready=ready, world_size=world)
    count = torch.cuda.device_count()
    nvlink = count > 1 and all(torch.cuda.can_device_access_peer(0, i) for i in range(1, count))
    return ParallelCaps("cuda", count, nvlink=nvlink, attention_heads=attention_heads, distributed_ready=ready,
                        world_size=world)


def apply_parallel(transformer: Any, plan: ParallelPlan, caps: ParallelCaps) -> tuple[bool, str]:
    """Apply a context-parallel plan to a diffusers transformer; (applied, reason) as a compiler pass reports. A
    single-device plan is not applied (its reason says why). CFG plans are not this function's: the compiler pass
    hooks them onto the UNet in-process (engine/compiler/parallel.py), so one here is a caller's mistake."""
    if plan.kind == "cfg":
        raise ValueError("a CFG-parallel plan is applied by the compiler's parallel pass (attach_cfg_parallel)")
    if plan.kind.startswith("context_"):
        if not caps.distributed_ready:
            return False, "context parallel needs torch.distributed initialised with one rank per GPU (torchrun)"
        from diffusers import ContextParallelConfig

        config = ContextParallelConfig(**plan.config)
        try:
            if caps.device_type == "cpu":
                _enable_parallelism_on_cpu(transformer, config)
            else:
                transformer.enable_parallelism(config=config)
            transformer.register_forward_pre_hook(_controlnet_sharder(transformer), with_kwargs=True)
        except (ValueError, RuntimeError) as e:  # e.g. an attention backend without context parallel support
            transformer._parallel_config = None  # resolved before diffusers checked the backend
            return False, f"diffusers refused it: {str(e).splitlines()[0]}"
        return True, plan.reason
    return False, plan.reason


def _enable_parallelism_on_cpu(transformer: Any, config: Any) -> None:
    """`enable_parallelism` on CPU ranks (gloo). diffusers places rank r on `accelerator:(r % accelerator count)`, a
    ZeroDivisionError without an accelerator (`ModelMixin._resolve_parallel_config`, 0.42.1); everything after it
    (backend check, processors, the split/gather hooks, the all-to-all) runs on CPU. So the config is resolved the same
    way here, on a CPU mesh, and `enable_parallelism` does the rest."""
    import torch
    from diffusers.models._modeling_parallel import ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    resolved = ParallelConfig(context_parallel_config=config)
    mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    resolved.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)

    def resolve(_config: Any) -> Any:
        transformer._parallel_config = resolved
        return resolved

    transformer._resolve_parallel_config = resolve  # instance attribute: this call only
    try:
        transformer.enable_parallelism(config=config)
    finally:
        del transformer._resolve_parallel_config


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    device: str  # this rank's device: "cuda:<LOCAL_RANK>" with GPUs, "cpu" otherwise

    @property
    def writes_output(self) -> bool:
        """Every rank computes the same image under context parallelism; only rank 0 saves or returns it."""
        return self.rank == 0

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block (loading: building a tiny model, filling the cache) before the others. Needed, not
        polite: under an initialised group transformers' `save_pretrained` writes weights on rank 0 only
        (`should_save_on_this_rank`), so a tiny model built by another rank would be cached without weights."""
        import torch.distributed as dist

        if self.world_size > 1 and self.rank != 0:
            dist.barrier()
        try:
            yield
        finally:
            if self.world_size > 1 and self.rank == 0:
                dist.barrier()


def join_process_group(device: str = "auto") -> RankInfo:
    """Under torchrun (WORLD_SIZE > 1 in the environment): initialise the default process group once (nccl for CUDA,
    gloo for CPU) and pin this rank to `cuda:LOCAL_RANK`. Otherwise rank 0 of 1 on `device`."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return RankInfo(0, 1, device)
    cuda = device != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return RankInfo(dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu")


# Residuals a FLUX ControlNet adds to the image tokens after each (double / single) block: lists whose length depends on
# the ControlNet, which diffusers' `_cp_plan` (fixed-length lists) cannot name.
CONTROLNET_SAMPLES = ("controlnet_block_samples", "controlnet_single_block_samples")


def _controlnet_sharder(transformer: Any) -> Any:
    """A forward pre-hook giving each rank its slice of the ControlNet residuals, cut as diffusers cuts the image
    tokens they are added to (`EquipartitionSharder` over the flattened context mesh, dim 1); without it a ControlNet
    request fails on a shape mismatch (each rank's half of the tokens plus the whole residual)."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    def shard(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mesh = transformer._parallel_config.context_parallel_config._flattened_mesh
        for name in CONTROLNET_SAMPLES:
            samples = kwargs.get(name)
            if samples:
                kwargs[name] = [None if s is None else EquipartitionSharder.shard(s, 1, mesh) for s in samples]
        return args, kwargs

    return shard
