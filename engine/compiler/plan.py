"""The compile plan: every decision the passes take, as data, from the config, the device's capabilities and the family.

`plan_compilation(config, caps, family)` is pure (no GPU, no model needed), so the plan for a T4 (sm_75), an A100
(sm_80), an L4 (sm_89), an H100 (sm_90) or a CPU is tested on a CPU (`engine.runtime.device.simulated_caps`). The
passes read the plan (`plan_of(ctx)`) and report from it.

The rules, each a table below:
- dtype: bf16 only where the hardware has it natively (CUDA >= 8.0), fp16 below (`best_half_dtype`).
- attention: per architecture, the fastest kernels first (Hopper: FA3, cuDNN; Ampere/Ada: FA2, cuDNN), SageAttention
  (int8 Q/K: lossy) only when the config allows lossy attention (O3); xFormers first before Ampere (no FlashAttention
  there) and ahead of plain SDPA elsewhere, where it is installed and no fullgraph compile is planned.
- quant: fp8 (torchao dynamic float8) needs >= 8.9; it runs before compile (see PASSES in __init__.py).
- step cache: its threshold is raised under fp8, whose noise alone moves the first block's residual.
- CUDA graphs only around the whole denoiser, compiled with `fullgraph=True, dynamic=False` (one graph per
  resolution, at most `recompile_limit` of them; further resolutions run eagerly). Never around regionally compiled
  blocks (a CUDA-graph tree takes every block call for a new iteration and overwrites the previous block's output,
  pytorch#152887) and never with the step cache (its residuals, kept across steps, are graph outputs that the next
  replay overwrites). Regional compile uses a mode without CUDA graphs.
- inductor flags (flux-fast's recipe) only on CUDA, applied in a scope around the compiled calls, never globally.
- kernels (engine/kernels Triton ops): "auto" on CUDA only; whether triton is installed is the pass's to check.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from ..families import FamilySpec, get_family
from ..runtime.device import DeviceCaps, best_half_dtype, device_caps
from .config import CompileConfig

# -- attention ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionKernel:
    name: str  # diffusers AttentionBackendName value
    min_capability: tuple[int, int]
    half_only: bool = True
    lossy: bool = False
    fullgraph_ok: bool = True  # traced by a fullgraph compile (custom ops); False: only with graph breaks allowed


ATTENTION_KERNELS: dict[str, AttentionKernel] = {k.name: k for k in (
    # SageAttention: int8 Q/K; diffusers calls `sageattn` directly (no custom op), unproven under fullgraph compile
    AttentionKernel("sage", (8, 0), lossy=True, fullgraph_ok=False),
    AttentionKernel("_flash_3", (9, 0)),  # FlashAttention 3 (flash_attn_interface)
    AttentionKernel("_flash_3_hub", (9, 0)),  # FA3 from the kernels hub (needs a download: never "installed" here)
    AttentionKernel("_native_cudnn", (8, 0)),  # cuDNN SDPA: on Hopper about as fast as FA3
    AttentionKernel("flash", (8, 0)),  # FlashAttention 2
    # xFormers' memory-efficient (cutlass) kernels, fp32 included: the memory-efficient attention of GPUs before
    # Ampere, where FlashAttention does not run; its Python dispatch breaks graphs under torch.compile (xformers#765)
    AttentionKernel("xformers", (5, 0), half_only=False, fullgraph_ok=False),
    AttentionKernel("native", (0, 0), half_only=False),  # PyTorch SDPA: picks its own kernel
)}

# "auto" tries these in order: the row of the highest capability the device reaches.
ATTENTION_ORDER: list[tuple[tuple[int, int], tuple[str, ...]]] = [
    ((9, 0), ("sage", "_flash_3", "_flash_3_hub", "_native_cudnn", "flash", "xformers", "native")),  # Hopper
    ((8, 0), ("sage", "flash", "_native_cudnn", "xformers", "native")),  # Ampere, Ada
    ((0, 0), ("xformers", "native")),  # Turing and older: xFormers where installed, else SDPA's memory-efficient
]


def backend_available(name: str) -> tuple[bool, str]:
    """Whether diffusers can run attention backend `name` with what is installed (hub kernels count as not)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name.endswith("_hub"):
        return False, "hub kernels need a download"
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except Exception as e:  # missing package, too-old version, unknown name
        return False, str(e).splitlines()[0] if str(e) else type(e).__name__
    return True, ""


@functools.lru_cache(maxsize=None)
def installed_attention_backends(names: tuple[str, ...] | None = None) -> frozenset[str]:
    """The diffusers attention backends whose packages are installed (probed once per process)."""
    from typing import get_args

    from .config import Attention

    candidates = names or tuple(n for n in get_args(Attention) if n not in ("default", "auto")) + tuple(
        ATTENTION_KERNELS)
    return frozenset(n for n in dict.fromkeys(candidates) if backend_available(n)[0])


def choose_attention(caps: DeviceCaps, dtype: str, allow_lossy: bool,
                     fullgraph: bool = False) -> tuple[str, tuple[str, ...]]:
    """The backend "auto" picks, and why each better one was passed over."""
    if not caps.is_cuda:
        return "native", (f"device is {caps.type}: native SDPA",)
    order = next(names for floor, names in ATTENTION_ORDER if caps.at_least(floor))
    passed: list[str] = []
    for name in order:
        kernel = ATTENTION_KERNELS[name]
        if kernel.lossy and not allow_lossy:
            passed.append(f"{name}: lossy (int8 Q/K), only where lossy attention is allowed (O3)")
        elif fullgraph and not kernel.fullgraph_ok:
            passed.append(f"{name}: not traceable by the whole-model fullgraph compile")
        elif kernel.half_only and dtype == "fp32":
            passed.append(f"{name}: needs half precision")
        elif name not in caps.attention_backends:
            passed.append(f"{name}: not installed")
        else:
            return name, tuple(passed)
    return "native", tuple(passed)


# -- quantization and the step cache -----------------------------------------------------------------------------

FP8_MIN_CAPABILITY = (8, 9)
# First-block cache threshold multiplier per quantization: fp8 noise alone moves the first block's residual, so the
# threshold that keeps bf16 images intact skips nothing under fp8 (ParaAttention's guide: ~0.12 for fp8 vs 0.08).
CACHE_THRESHOLD_SCALE: dict[str, float] = {"fp8": 1.5}
# Whether a family's denoiser class has diffusers cache hooks (CacheMixin), keyed by FamilySpec.denoiser.
STEP_CACHE_HOOKS: dict[str, bool] = {"transformer": True, "unet": False}


def choose_quant(kind: str, caps: DeviceCaps) -> tuple[str | None, str]:
    fp8_ok = caps.is_cuda and caps.at_least(FP8_MIN_CAPABILITY)
    if kind == "none":
        return None, "disabled in config"
    if kind == "auto":
        if fp8_ok:
            return "fp8", ""
        if caps.is_cuda:
            return "int8_dynamic", "fp8: needs CUDA compute capability >= 8.9"
        # Measured (benchmarks/quant_speed.py): on a CPU with native bf16, torchao's int8 paths are slower than the
        # bf16 matmuls O1 already picks, so "auto" (the O3 level) leaves the weights alone rather than trade accuracy
        # for a loss. Not measured: compiled int8 (O3 compiles after quantizing), CPUs without native bf16.
        return None, (f"auto on {caps.type}: int8 measured slower than bf16 (eager small-SDXL UNet forward, 256 px, "
                      "1 thread, Xeon with native bf16: int8 weight-only 1.26x, dynamic int8 2.52x the bf16 time; "
                      "benchmarks/results/quant_cpu.md); fp8 needs CUDA compute capability >= 8.9; set "
                      "quant='int8_weight_only' or 'int8_dynamic' to quantize anyway")
    if kind == "fp8" and not fp8_ok:
        where = f"compute capability {caps.capability[0]}.{caps.capability[1]}" if caps.capability else \
            f"device is {caps.type}"
        return None, f"fp8: needs CUDA compute capability >= 8.9 ({where})"
    return kind, ""


def choose_cache(config: CompileConfig, family: FamilySpec, quant: str | None,
                 hooks: bool | None = None) -> tuple[str | None, float, str]:
    """(kind or None, threshold, note)."""
    if config.cache == "none":
        return None, config.cache_threshold, "disabled in config"
    has_hooks = STEP_CACHE_HOOKS.get(family.denoiser, False) if hooks is None else hooks
    if not has_hooks:
        return None, config.cache_threshold, f"the {family.name} {family.denoiser} has no diffusers cache hooks"
    kind = "first_block" if config.cache == "auto" else config.cache
    scale = CACHE_THRESHOLD_SCALE.get(quant or "", 1.0)
    threshold = min(1.0, round(config.cache_threshold * scale, 6))
    note = (f"threshold {threshold} ({config.cache_threshold} x {scale} under {quant} quantization)"
            if scale != 1.0 else f"threshold {threshold}")
    return kind, threshold, note


# -- compile and CUDA graphs -------------------------------------------------------------------------------------

# torch.compile mode by (CUDA graphs, max-autotune)
COMPILE_MODES: dict[tuple[bool, bool], str | None] = {
    (False, False): None,
    (False, True): "max-autotune-no-cudagraphs",
    (True, False): "reduce-overhead",
    (True, True): "max-autotune",
}
MODE_TRAITS: dict[str | None, tuple[bool, bool]] = {v: k for k, v in COMPILE_MODES.items()} | {"default": (False,
                                                                                                          False)}
# flux-fast / diffusers' speed-up guide: 1x1 convolutions as matmuls, coordinate-descent tuning of kernel configs
# (all directions), no pointwise epilogues fused into matmuls (keeps the fast cuBLAS/template matmuls).
INDUCTOR_FLAGS_CUDA: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


@dataclass(frozen=True)
class CompilePlan:
    caps: DeviceCaps
    family: str
    dtype: Literal["fp32", "bf16", "fp16"]
    attention: str | None  # the dispatcher backend; None: leave the model's default
    attention_passed: tuple[str, ...]
    quant: str | None
    quant_note: str
    cache: str | None
    cache_threshold: float
    cache_note: str
    compile: bool
    compile_scope: Literal["whole", "regional"] | None  # regional: the repeated blocks (whole if a model has none)
    compile_mode: str | None
    vae_compile_mode: str | None  # never CUDA graphs: one call per job, nothing to win
    fullgraph: bool
    dynamic: bool
    cuda_graphs: bool
    cuda_graphs_note: str
    recompile_limit: int
    inductor_flags: Mapping[str, Any] = field(default_factory=dict)
    autotune_note: str = ""
    kernels: bool = False  # swap in the engine's Triton kernels (engine/compiler/kernels.py)
    kernels_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["caps"] = {**d["caps"], "attention_backends": sorted(self.caps.attention_backends)}
        d["inductor_flags"] = dict(self.inductor_flags)
        return d

    def compile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.compile_mode:
            kwargs["mode"] = self.compile_mode
        return kwargs


_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _dtype(config: CompileConfig, caps: DeviceCaps) -> str:
    if config.dtype != "auto":
        return config.dtype
    half = best_half_dtype(caps)
    return _DTYPE_NAMES[str(half)] if half is not None else "fp32"


def _graphs(config: CompileConfig, caps: DeviceCaps, cache: str | None) -> tuple[bool, str]:
    """Whether the denoiser runs as CUDA graphs, and why (not)."""
    reasons = [  # the first that holds wins
        (config.cuda_graphs is False, "disabled in config"),
        (not caps.is_cuda, f"cuda graphs: device is {caps.type}"),
        (not config.compile, "needs compile (CUDA graphs are captured by torch.compile)"),
        (cache is not None, f"not with the {cache} step cache: it keeps residuals across steps that a CUDA-graph "
                            "replay overwrites (pytorch#152887); regional compile without graphs instead"),
    ]
    for holds, why in reasons:
        if holds:
            return False, why
    return True, ("whole denoiser, static shapes (fullgraph, dynamic=False): one CUDA graph per resolution, at most "
                  f"{config.recompile_limit} (recompile_limit), further resolutions run eagerly")


def choose_kernels(setting: Any, caps: DeviceCaps) -> tuple[bool, str]:
    """Whether the kernels pass swaps in the Triton kernels, and why (not)."""
    if setting is False:
        return False, "disabled in config"
    if setting is True:
        return True, "forced on in config"
    if caps.is_cuda:
        return True, f"auto on {caps.describe()}"
    return False, f"auto: device is {caps.type} (the Triton kernels run on CUDA; force with kernels=True)"


def plan_compilation(config: CompileConfig, caps: DeviceCaps, family: FamilySpec | str, *,
                     step_cache_hooks: bool | None = None) -> CompilePlan:
    """Every pass decision for `config` on a device with `caps`, for a model of `family`.

    `step_cache_hooks` overrides the family table's answer to "does the denoiser have diffusers cache hooks" (the
    passes replan with the real answer if the model disagrees)."""
    fam = get_family(family) if isinstance(family, str) else family
    dtype = _dtype(config, caps)

    quant, quant_note = choose_quant(config.quant, caps)
    cache, threshold, cache_note = choose_cache(config, fam, quant, step_cache_hooks)
    graphs, graphs_note = _graphs(config, caps, cache)
    fullgraph = True if graphs else (False if cache else config.compile_fullgraph)

    if config.attention == "default":
        attention, passed = None, ("default attention requested",)
    elif config.attention == "auto":
        attention, passed = choose_attention(caps, dtype, config.attention_allow_lossy, config.compile and fullgraph)
    elif config.attention in caps.attention_backends:
        attention, passed = config.attention, ()
    else:
        attention, passed = "native", (f"{config.attention}: not available here",)

    kernels, kernels_note = choose_kernels(config.kernels, caps)
    explicit = MODE_TRAITS.get(config.compile_mode) if config.compile_mode else None
    dynamic = False if graphs else config.compile_dynamic
    autotune_wanted = explicit[1] if explicit else (config.compile_autotune and caps.is_cuda)
    autotune = autotune_wanted and not dynamic
    autotune_note = ("max-autotune: needs static shapes (dynamic=True here)" if autotune_wanted and dynamic
                     else "max-autotune" if autotune else "")
    if config.compile_mode and explicit is None:  # a mode this table does not know: passed through, never graphs
        mode: str | None = config.compile_mode
    else:
        mode = COMPILE_MODES[(graphs, autotune)]
    return CompilePlan(
        caps=caps, family=fam.name, dtype=dtype, attention=attention, attention_passed=passed,
        quant=quant, quant_note=quant_note, cache=cache, cache_threshold=threshold, cache_note=cache_note,
        compile=config.compile,
        compile_scope=("whole" if graphs else "regional") if config.compile else None,
        compile_mode=mode if config.compile else None,
        vae_compile_mode=COMPILE_MODES[(False, autotune)] if config.compile else None,
        fullgraph=fullgraph,
        dynamic=dynamic, cuda_graphs=graphs, cuda_graphs_note=graphs_note,
        recompile_limit=config.recompile_limit,
        inductor_flags=dict(INDUCTOR_FLAGS_CUDA) if (caps.is_cuda and config.inductor_tuning and config.compile)
        else {},
        autotune_note=autotune_note,
        kernels=kernels, kernels_note=kernels_note,
    )


def caps_for(device: Any) -> DeviceCaps:
    """The real device's capabilities, with the attention backends installed here."""
    return device_caps(device, installed_attention_backends())


def plan_of(ctx: Any) -> CompilePlan:
    """The plan of a pass context: computed on first use from the real device (or `state["caps"]`, a DeviceCaps a
    caller put there), kept in `state["plan"]`."""
    plan = ctx.state.get("plan")
    if plan is None:
        caps = ctx.state.get("caps") or caps_for(ctx.device)
        ctx.state["caps"] = caps
        plan = ctx.state["plan"] = plan_compilation(ctx.config, caps, ctx.family)
    return plan


def replan(ctx: Any, **assumptions: Any) -> CompilePlan:
    """Recompute the plan when a pass finds the model differs from the family table (e.g. cache hooks)."""
    plan = ctx.state["plan"] = plan_compilation(ctx.config, plan_of(ctx).caps, ctx.family, **assumptions)
    return plan
