"""Memory planning: which placement a model gets on a device budget, decided before a single weight is read.

Three steps, each data-driven:

1. **Sizes.** Every component is built from its config on the meta device (`build_meta_component`, the same
   builder the single-file loader uses) and counted: parameters (tied weights once), buffers, the part that
   diffusers' layerwise casting would store in fp8, the Linear weights a weight-only quantizer would pack, and the
   groups `apply_group_offloading(offload_type="block_level")` would form. A request's ControlNets and IP-Adapter
   image encoder are sized the same way and join the model's sizes for that request (`with_adjuncts`); the swap
   rungs put them in the denoiser's / text encoders' group (`SWAPS_WITH`). Counts are cached per folder (building
   FLUX's 12 B-parameter transformer on meta takes ~0.1 s, the imports more); bytes follow from the dtype of each
   component (a `torch.dtype`, or a policy `(name, class_name, config) -> dtype` as the loaders take).
2. **Activations.** `estimate_activations` turns a request (size, images, CFG, attention kernel) into bytes per stage
   from a small table of per-family coefficients (`ACTIVATIONS`, derivation in its docstring).
3. **The ladder.** `LADDER` lists the plans from the richest down; `plan_memory` takes the first one whose expected
   device peak fits the budget (and whose host RAM fits, when a host budget is known), and records for each richer
   plan why it did not fit. Lossy storage (fp8 layerwise casting, torchao int8 weight-only, bitsandbytes NF4) is
   only considered with `allow_lossy`. GGUF files are a load-time choice of the checkpoint (diffusers'
   `GGUFQuantizationConfig`); the planner does not pick them.

Device peak of a plan = weights on the device while the heaviest stage runs (everything for `resident`, the
stage's swap group for the offload plans, the unmatched modules plus the largest one or two consecutive block
groups for group offload) + that stage's activations + `RESERVE_BYTES`. The estimate is conservative by design;
`next_plan` steps one rung down when it was not conservative enough (the engine's OOM fallback).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from ..errors import InsufficientMemoryError, InvalidRequestError
from ..families import FamilySpec, get_family

GB = 10**9
GIB = 2**30
RESERVE_BYTES = 512 * 2**20  # allocator fragmentation, cuBLAS/cuDNN workspaces, the sampler's small tensors

DtypeRule = Union[torch.dtype, Callable[[str, str, Mapping[str, Any]], torch.dtype]]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float8_e4m3fn: "fp8", torch.int8: "int8", torch.uint8: "uint8"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ------------------------------------------------------------------------------------------------------- budget
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: int | float | str) -> int:
    """Bytes from "24GB" (10^9, as accelerate's `max_memory` and card vendors count), "24GiB" (2^30), "12000MB",
    "24 gb" or a plain number of bytes."""
    if isinstance(value, bool):
        raise InvalidRequestError("max_memory", f"{value!r} is not a size", "an integer of bytes or e.g. 24GB")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidRequestError("max_memory", "must be positive", "> 0", value)
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(value).lower())
    if not match:
        raise InvalidRequestError("max_memory", f"{value!r} is not a size", "e.g. 24GB, 24GiB, 12000MB or bytes", value)
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit and not unit.endswith("b"):
        unit += "b"
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise InvalidRequestError("max_memory", "must be positive", "> 0", value)
    return size


def format_bytes(n: int | float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryBudget:
    """What a plan may use: device bytes for its peak; host bytes for what it keeps off the device (None: not
    checked). `device_type` decides whether offload plans exist at all (not on the CPU) and whether group offload
    prefetches the next group on a CUDA stream (one more group resident)."""

    device_bytes: int
    host_bytes: int | None = None
    device_type: str = "cuda"
    source: str = "max_memory"  # "max_memory" or "detected"

    def describe(self) -> str:
        host = f", host {format_bytes(self.host_bytes)}" if self.host_bytes is not None else ""
        return f"{format_bytes(self.device_bytes)} on {self.device_type} ({self.source}){host}"


def detect_budget(device: torch.device | str, max_memory: int | str | None = None,
                  max_host_memory: int | str | None = None) -> MemoryBudget:
    """Explicit `max_memory` wins; else the free memory the device reports now (CUDA `mem_get_info` plus what torch's
    caching allocator holds unused, MPS' recommended working set minus what the driver holds, available RAM for the
    CPU). Host: available RAM. Memory held by models already loaded is not free: the caller accounts for them."""
    device = torch.device(device)
    host = parse_memory(max_host_memory) if max_host_memory is not None else _available_ram()
    if max_memory is not None:
        return MemoryBudget(parse_memory(max_memory), host, device.type, "max_memory")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch reuses these
        return MemoryBudget(int(free + cached), host, "cuda", "detected")
    if device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return MemoryBudget(int(free), host, "mps", "detected")
    return MemoryBudget(host or 0, None, device.type, "detected")  # weights live in RAM: the device is the host


def _available_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# -------------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ComponentCounts:
    """Dtype-free counts of one component (element counts, except `fixed_bytes`), cached per config folder."""

    class_name: str
    params: int  # parameters, tied weights once
    float_buffers: int  # floating-point buffers: they follow the component's dtype
    fixed_bytes: int  # integer buffers (position ids): their own dtype
    castable: int  # elements diffusers' layerwise casting stores in fp8 (Linear/Conv outside its skip patterns)
    linear_weights: int  # Linear weights a weight-only quantizer packs (in, out >= 16, as compiler.quant does)
    linear_rows: int  # their output rows: one scale each for int8
    group_always: int  # block-level group offload: elements outside every block group (onloaded with the module)
    group_max: int  # largest block group
    group_pair: int  # largest two consecutive groups (the next one is prefetched on a CUDA stream)
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    prequantized: bool = False  # loaded quantized (GGUF, NF4): stored as is under every plan


@dataclass(frozen=True)
class ComponentSize:
    """One component in its dtype: bytes as stored, and what each lossy storage would make of them."""

    name: str
    role: str  # "denoiser", "text_encoder", "vae", "upsampler"; per request: "controlnet", "image_encoder"
    class_name: str
    dtype: str
    params: int
    bytes: int
    storage_bytes: Mapping[str, int]  # "compute" (= bytes), "fp8", "int8", "nf4"
    group_always: int  # bytes, in the compute dtype
    group_max: int
    group_pair: int
    width: int = 0  # activation width from the config (see SHAPES), 0: the family's default
    heads: int = 0  # attention heads of its largest self-attention, 0: the family's default
    residuals: float = 0.0  # a ControlNet: the residual maps it hands the denoiser, in maps of width x tokens

    def stored(self, storage: str) -> int:
        return self.storage_bytes.get(storage, self.bytes)

    def group_footprint(self, storage: str, prefetch: bool) -> int:
        """Device bytes under block-level group offload: unmatched modules + the running (and prefetched) group."""
        scale = self.stored(storage) / self.bytes if self.bytes else 1.0
        return int((self.group_always + (self.group_pair if prefetch else self.group_max)) * scale)


@dataclass(frozen=True)
class ModelSizes:
    """Every sized component of one model, with the family whose activation coefficients apply."""

    model: str
    family: str
    components: tuple[ComponentSize, ...]

    @property
    def weights_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def by_role(self, *roles: str) -> list[ComponentSize]:
        return [c for c in self.components if c.role in roles]


# Text encoders that block-level group offload can only split through their submodules: transformers models hold
# their layer list below a wrapper (`encoder.block`, `text_model.encoder.layers`); diffusers models name theirs in
# `_group_offload_block_modules`, which `apply_group_offloading` reads itself.
GROUP_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "T5EncoderModel": ("encoder",),
    "CLIPTextModel": ("text_model", "encoder"),
    "CLIPTextModelWithProjection": ("text_model", "encoder"),
    "CLIPVisionModelWithProjection": ("vision_model", "encoder"),  # an IP-Adapter's image encoder
}


def group_block_modules(module: torch.nn.Module) -> tuple[str, ...] | None:
    names = GROUP_BLOCK_MODULES.get(type(module).__name__) or getattr(module, "_group_offload_block_modules", None)
    return tuple(names) if names else None


def layerwise_skip_patterns(module: torch.nn.Module) -> tuple[str, ...]:
    """The skip patterns `ModelMixin.enable_layerwise_casting` uses: defaults + the class's own + fp32 modules."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    extra = [*(getattr(module, "_skip_layerwise_casting_patterns", None) or ()),
             *(getattr(module, "_keep_in_fp32_modules", None) or ())]
    return tuple(dict.fromkeys((*DEFAULT_SKIP_MODULES_PATTERN, *extra)))


def _unique_numel(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _module_numel(module: torch.nn.Module, seen: set[int]) -> int:
    return _unique_numel(module.parameters(), seen) + _unique_numel(
        (b for b in module.buffers() if b.is_floating_point()), seen)


def _group_layout(module: torch.nn.Module, blocks: tuple[str, ...], seen: set[int]) -> tuple[int, list[int]]:
    """Mirror of diffusers' block-level grouping: ModuleList/Sequential children give one group per block, children
    named in `blocks` are recursed into, everything else (and the module's own tensors) is onloaded with it."""
    always, groups = 0, []
    for name, child in module.named_children():
        if name in blocks:
            inner_always, inner = _group_layout(child, blocks, seen)
            always += inner_always
            groups += inner
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            groups += [_module_numel(block, seen) for block in child]
        else:
            always += _module_numel(child, seen)
    always += _unique_numel(module.parameters(recurse=False), seen)
    always += _unique_numel((b for b in module.buffers(recurse=False) if b.is_floating_point()), seen)
    return always, groups


def count_module(module: torch.nn.Module) -> ComponentCounts:
    """Counts of a module on any device (meta included)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    seen_params: set[int] = set()
    params = _unique_numel((p for p in module.parameters() if p.is_floating_point()), seen_params)
    # Pre-quantized weights (GGUF, bitsandbytes) are integer tensors: their bytes as stored, not a dtype's multiple.
    quantized = [p for p in module.parameters() if not p.is_floating_point() and id(p) not in seen_params]
    buffers = [b for b in module.buffers()]
    float_buffers = sum(b.numel() for b in buffers if b.is_floating_point())
    fixed = sum(b.numel() * b.element_size() for b in [*buffers, *quantized] if not b.is_floating_point())
    skip = [re.compile(p) for p in layerwise_skip_patterns(module)]
    castable, linear_weights, linear_rows, seen = 0, 0, 0, set()
    for name, sub in module.named_modules():
        if isinstance(sub, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not any(p.search(name) for p in skip):
            castable += _unique_numel(sub.parameters(), seen)
        if isinstance(sub, torch.nn.Linear) and sub.in_features >= 16 and sub.out_features >= 16:
            linear_weights += sub.weight.numel()
            linear_rows += sub.out_features
    always, groups = _group_layout(module, group_block_modules(module) or (), set())
    pair = max((a + b for a, b in zip(groups, groups[1:])), default=max(groups, default=0))
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return ComponentCounts(type(module).__name__, params, float_buffers, fixed, castable, linear_weights,
                           linear_rows, always, max(groups, default=0), pair, config,
                           prequantized=is_prequantized(module))


def is_prequantized(module: torch.nn.Module) -> bool:
    """Loaded already quantized (GGUF, bitsandbytes): no further storage change or quantization applies to it."""
    return getattr(module, "hf_quantizer", None) is not None or any(
        not p.is_floating_point() for p in module.parameters())


# Bytes per stored element of each lossy storage, and what it adds per packed row / per block: fp8 layerwise casting
# stores castable layers in float8_e4m3fn; torchao int8 weight-only stores int8 + one scale per output row;
# bitsandbytes NF4 stores 4 bits + an absmax per 64 values (double quantization makes that ~0.5 byte/64).
STORAGES: dict[str, str] = {
    "compute": "weights in the compute dtype",
    "fp8": "fp8 (e4m3) storage, compute in the compute dtype (diffusers layerwise casting)",
    "int8": "int8 weight-only (torchao Int8WeightOnlyConfig; fp8 weight-only is the same size)",
    "nf4": "NF4 4-bit weights (bitsandbytes, applied at load)",
}
LOSSY_ROLES = ("denoiser", "text_encoder")  # the VAE stays in its dtype under every storage (small, quality-critical)


def _storage_bytes(counts: ComponentCounts, itemsize: int, role: str) -> dict[str, int]:
    full = (counts.params + counts.float_buffers) * itemsize + counts.fixed_bytes
    if role not in LOSSY_ROLES or counts.prequantized:
        return {"compute": full}
    return {
        "compute": full,
        "fp8": full - counts.castable * (itemsize - 1),
        "int8": full - counts.linear_weights * (itemsize - 1) + counts.linear_rows * itemsize,
        "nf4": full - counts.linear_weights * itemsize + math.ceil(counts.linear_weights * (0.5 + 0.5 / 64)),
    }


def component_role(name: str, family: FamilySpec) -> str:
    if name == family.denoiser:
        return "denoiser"
    if name.startswith("text_encoder"):
        return "text_encoder"
    if name.startswith("controlnet"):
        return "controlnet"
    return name  # "vae", "upsampler", "image_encoder"


def default_dtype_rule(compute: torch.dtype) -> Callable[[str, str, Mapping[str, Any]], torch.dtype]:
    """The compiler's safe defaults: under fp16 a `force_upcast` VAE and T5 stay fp32 (they overflow there); bf16
    has fp32's range. Pass the loader's own policy instead to size exactly what it loads."""

    def rule(name: str, class_name: str, config: Mapping[str, Any]) -> torch.dtype:
        if compute == torch.float16 and ((name == "vae" and config.get("force_upcast")) or class_name.startswith("T5")):
            return torch.float32
        return compute

    return rule


def _unet_shape(c: Mapping[str, Any]) -> tuple[int, int]:
    heads = c["attention_head_dim"]  # diffusers' UNet config calls the head count attention_head_dim
    levels = [i for i, t in enumerate(c["down_block_types"]) if t.startswith("CrossAttn")]
    return c["block_out_channels"][0], (heads[levels[0]] if isinstance(heads, list) and levels else heads)


# Layer shapes the activation estimate reads from each component's config: (width, attention heads).
SHAPES: dict[str, Callable[[Mapping[str, Any]], tuple[int, int]]] = {
    "UNet2DConditionModel": _unet_shape,
    "FluxTransformer2DModel": lambda c: (c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"]),
    "T5EncoderModel": lambda c: (c["d_model"], c["num_heads"]),
    "CLIPTextModel": lambda c: (c["hidden_size"], c["num_attention_heads"]),
    "CLIPTextModelWithProjection": lambda c: (c["hidden_size"], c["num_attention_heads"]),
    "CLIPVisionModelWithProjection": lambda c: (c["hidden_size"], c["num_attention_heads"]),
    "ControlNetModel": _unet_shape,
    "FluxControlNetModel": lambda c: (c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"]),
    # the decoder's full-resolution map right after the last upsampling has the second-narrowest width
    "AutoencoderKL": lambda c: (c["block_out_channels"][min(1, len(c["block_out_channels"]) - 1)], 1),
}


# Residual maps a ControlNet hands its denoiser (they stay alive through the denoiser's call), in maps of the
# denoiser's activation width x tokens. UNet ControlNets: conv_in + every down resnet/downsampler + the mid block,
# at falling resolution and rising width: ~5.5 level-0 maps for SD/SDXL's 3-4 levels (the same sum as the UNet's
# skip stack in `ActivationSpec`), 6 with rounding up. FLUX ControlNets: one image-token map per block.
RESIDUALS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "ControlNetModel": lambda c: 6.0,
    "FluxControlNetModel": lambda c: float(c.get("num_layers", 0) + c.get("num_single_layers", 0)),
}


def _shape(counts: ComponentCounts) -> tuple[int, int]:
    try:
        return SHAPES[counts.class_name](counts.config)
    except (KeyError, IndexError, TypeError):
        return 0, 0


def size_components(model: str, family: FamilySpec | str, counts: Mapping[str, ComponentCounts],
                    dtype: DtypeRule | Mapping[str, torch.dtype]) -> ModelSizes:
    """Counts → bytes in each component's dtype (one dtype, a per-name mapping, or a policy callable)."""
    family = get_family(family) if isinstance(family, str) else family
    if isinstance(dtype, torch.dtype):
        rule = default_dtype_rule(dtype)
    elif isinstance(dtype, Mapping):
        table = dict(dtype)
        rule = lambda name, cls, cfg: table[name]  # noqa: E731
    else:
        rule = dtype
    sizes = []
    for name, c in counts.items():
        dt = rule(name, c.class_name, c.config)
        itemsize = torch.empty((), dtype=dt).element_size()
        role = component_role(name, family)
        storage = _storage_bytes(c, itemsize, role)
        width, heads = _shape(c)
        residuals = RESIDUALS[c.class_name](c.config) if c.class_name in RESIDUALS else 0.0
        sizes.append(ComponentSize(name, role, c.class_name, DTYPE_NAMES.get(dt, str(dt)), c.params,
                                   storage["compute"], storage, c.group_always * itemsize, c.group_max * itemsize,
                                   c.group_pair * itemsize, width, heads, residuals))
    return ModelSizes(model, family.name, tuple(sizes))


@functools.lru_cache(maxsize=64)
def folder_counts(folder: str) -> tuple[tuple[str, ComponentCounts], ...]:
    """Counts of every model component a diffusers folder's model_index.json names (built on meta; cached)."""
    from ..loading.classes import component_kind
    from ..loading.single_file import build_meta_component

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    out = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if component_kind(entry[0], entry[1]) != "model":
            continue
        out.append((name, count_module(build_meta_component(Path(folder), name))))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def tiny_counts(name: str) -> tuple[tuple[str, ComponentCounts], ...]:
    """Counts of a tiny config (configs/tiny/<name>.yaml), its modules built on meta by the tiny builder itself."""
    from accelerate import init_empty_weights

    from ..loading.tiny import build_tiny_components

    with init_empty_weights(include_buffers=False):
        parts = build_tiny_components(name)
    modules = {k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    for module in modules.values():
        if getattr(module, "_tied_weights_keys", None) and hasattr(module, "tie_weights"):
            module.tie_weights()  # as the loaders do: on meta, T5's embed_tokens -> shared is not tied yet
    return tuple((k, count_module(v)) for k, v in modules.items())


@functools.lru_cache(maxsize=8)
def aurasr_counts(tiny: str | None = None) -> tuple[tuple[str, ComponentCounts], ...]:
    """AuraSR's generator: the shipped defaults (the released checkpoints' config), or a tiny config's."""
    from ..models.aurasr import AuraSRConfig, AuraSRGenerator

    config = AuraSRConfig()
    if tiny is not None:
        from ..loading.tiny import _read

        raw, _, _ = _read(tiny)
        config = AuraSRConfig.from_dict(raw["components"]["upsampler"]["config"])
    with torch.device("meta"):
        module = AuraSRGenerator(config)
    return (("upsampler", count_module(module)),)


def counts_for_model(model: str) -> tuple[str, tuple[tuple[str, ComponentCounts], ...]] | None:
    """(family, counts) for a registry id (its shipped arch configs, its tiny config, or its preset's base), a
    diffusers folder, or a hub id whose snapshot is cached; None for what cannot be sized without weights (a single
    file: size the loaded components with `sizes_from_components`)."""
    from ..paths import configs_dir
    from ..registry import find_spec

    spec = find_spec(model)
    if spec is not None:
        if spec.base is not None:
            return counts_for_model(spec.base)
        if spec.family_spec.task == "upscale":
            return spec.family, aurasr_counts(spec.tiny_config)
        if spec.is_tiny:
            return spec.family, tiny_counts(spec.tiny_config or "")
        arch = configs_dir() / "arch" / (spec.arch or "")
        if spec.arch and (arch / "model_index.json").is_file():
            return spec.family, folder_counts(str(arch.resolve()))
        from ..loading.pretrained import cached_snapshot

        folder = cached_snapshot(spec.source)
        return (spec.family, folder_counts(str(folder))) if folder is not None else None
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file():
        from ..loading.pretrained import cached_snapshot

        if folder.suffix or "/" not in model:
            return None
        snapshot = cached_snapshot(model)
        if snapshot is None:
            return None
        folder = snapshot
    from ..loading.pretrained import folder_family

    return folder_family(folder).name, folder_counts(str(folder.resolve()))


def size_model(model: str, dtype: DtypeRule | Mapping[str, torch.dtype] = torch.bfloat16) -> ModelSizes | None:
    """Bytes of every component of `model` in `dtype`, no weight read; None when only loaded weights can tell."""
    found = counts_for_model(model)
    if found is None:
        return None
    family, counts = found
    return size_components(model, family, dict(counts), dtype)


def sizes_from_components(model: str, family: FamilySpec | str, components: Mapping[str, Any]) -> ModelSizes:
    """Sizes of loaded components, each in the dtype it holds now."""
    modules = {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    counts = {k: count_module(v) for k, v in modules.items()}
    dtypes = {k: next((p.dtype for p in v.parameters() if p.is_floating_point()), torch.float32)
              for k, v in modules.items()}
    return size_components(model, family, counts, dtypes)


# Modules a request brings along (not part of the model's folder): their sizes join the model's for that request.
ADJUNCT_ROLES = ("controlnet", "image_encoder")


@functools.lru_cache(maxsize=32)
def _config_counts(cls: type, config_json: str) -> ComponentCounts:
    from accelerate import init_empty_weights

    config = json.loads(config_json)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):  # diffusers ModelMixin
            module = cls.from_config(config)
        else:  # transformers PreTrainedModel
            module = cls(cls.config_class.from_dict(config))
    return count_module(module)


def adjunct_counts(module: torch.nn.Module) -> ComponentCounts:
    """Counts of a request's ControlNet or IP-Adapter image encoder, from its config rebuilt on the meta device
    (as the model's own components are sized), cached per class and config; a module its config cannot rebuild
    (a caller's own subclass with extra weights) is counted as it is."""
    config = getattr(module, "config", None)
    raw = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    if raw is None:
        return count_module(module)
    try:
        counts = _config_counts(type(module), json.dumps(raw, sort_keys=True, default=str))
    except Exception:  # noqa: BLE001 - a config its class cannot rebuild: count the module itself
        return count_module(module)
    own = sum(p.numel() for p in module.parameters() if p.is_floating_point())
    return counts if abs(own - counts.params) <= own // 100 else count_module(module)


def with_adjuncts(sizes: ModelSizes, family: FamilySpec | str,
                  adjuncts: Mapping[str, torch.nn.Module]) -> ModelSizes:
    """`sizes` plus a request's ControlNets / image encoder (named "controlnet", "controlnet_1", ...,
    "image_encoder"), each in the dtype it holds."""
    if not adjuncts:
        return sizes
    counts = {name: adjunct_counts(m) for name, m in adjuncts.items()}
    dtypes = {name: next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
              for name, m in adjuncts.items()}
    extra = size_components(sizes.model, family, counts, dtypes).components
    kept = tuple(c for c in sizes.components if c.role not in ADJUNCT_ROLES)
    return replace(sizes, components=kept + extra)


# -------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationSpec:
    """Per-family coefficients of the activation estimate (all an estimate, conservative by a small factor).

    Denoiser: the widest working set sits at the highest-resolution level. It is `live` tensors of
    tokens x `width` (tokens = pixels / `token_stride`^2 + `text_tokens` joined to the stream), per batch element.
    Without a fused attention kernel the scores (and their softmax) of the largest self-attention add
    2 x heads x tokens^2 per element (`attn_stride`, `attn_heads`; 0 heads: no attention that size).
    VAE decoder: at full resolution it holds `decode_live` maps of `decode_width` channels (the upsampled 256-channel
    map, its GroupNorm and activation, before the last block narrows to 128), and its mid-block attention runs over
    latent pixels with one head (scores only without a fused kernel).
    Text encoders: tokens x hidden x `text_live` per prompt (T5-XXL at 512 tokens: 0.05 GB; CLIP: a few MiB).
    Widths and head counts are read from each component's config (`SHAPES`), so a tiny or a retrained variant is
    estimated at its own widths; the numbers in this table are the fallback for configs `SHAPES` does not know.

    Where the numbers come from (1 image, bf16):
    - SD 1.5 (512x512): level 0 is 64x64 latent pixels x 320 channels with attention (8 heads over 4096 tokens).
      The up path concatenates 640+320 channels, GroupNorm copies, GEGLU's 8x-wide hidden (~12 units) and the skip
      stack of all down outputs (~5.5 units of 320 channels at level 0): `live` 20 -> 0.05 GB per CFG element;
      without a fused kernel the level-0 scores add 2 x 8 x 4096^2 x 2 B = 0.54 GB.
    - SDXL (1024x1024): level 0 (128x128 x 320) has no attention; attention starts at 64x64 x 640 (10 heads) and the
      1280-wide level has 10 transformer layers. Skip stack ~5.5 units + up-path concat/GroupNorm ~8 units + the
      attention level's GEGLU (~2.5 units): `live` 16 -> 0.17 GB per CFG element; scores without flash 0.67 GB.
    - FLUX (1024x1024): 4096 image + 512 text tokens x 3072. A single-stream block holds the input, its norm, QKV
      (3x), the MLP (4x) and its GELU (4x), and the 5x-wide concat before the output projection: `live` 20 ->
      0.57 GB; 24 heads of scores without flash: 2 x 24 x 4608^2 x 2 B = 2.0 GB.
    - VAE (SD/SDXL/FLUX share the decoder shape): at 1024x1024, 3 maps x 256 channels x 1 Mpx: 1.6 GB in bf16,
      3.2 GB in fp32 (the fp16-unsafe VAE). Tiling caps this at one tile (the VAE's sample_size, 512 or 1024 px);
      slicing decodes one image at a time.
    """

    token_stride: int
    width: int
    live: float
    text_tokens: int = 0
    attn_stride: int = 0
    attn_heads: int = 0
    decode_width: int = 256
    decode_live: float = 3.0
    decode_attn_stride: int = 8
    text_width: int = 768
    text_len: int = 77
    text_live: float = 12.0


ACTIVATIONS: dict[str, ActivationSpec] = {
    "sd15": ActivationSpec(token_stride=8, width=320, live=20, attn_stride=8, attn_heads=8),
    "sdxl": ActivationSpec(token_stride=8, width=320, live=16, attn_stride=16, attn_heads=10, text_width=1280),
    "flux": ActivationSpec(token_stride=16, width=3072, live=20, text_tokens=512, attn_stride=16, attn_heads=24,
                           text_width=4096, text_len=512),
    # AuraSR: batches of 64x64 tiles into 256x256 outputs; the widest map is 64 channels at the output size and the
    # 8-head attention runs at 1/16 of the output resolution. Treated as one "denoise" stage over the tile batch.
    "aurasr": ActivationSpec(token_stride=1, width=64, live=12, attn_stride=16, attn_heads=8, decode_width=0,
                             text_len=0),
}


@dataclass(frozen=True)
class PlanRequest:
    """What the activations depend on. `cfg=None`: the family's default (SD: a negative branch doubles the batch;
    FLUX: guidance-distilled, no doubling). `flash_attention`: a fused SDPA kernel (no score matrices)."""

    width: int
    height: int
    num_images: int = 1
    cfg: bool | None = None
    flash_attention: bool = True
    max_sequence_length: int | None = None  # FLUX: T5 tokens (default 512)

    def describe(self) -> str:
        return f"{self.width}x{self.height} x{self.num_images}"


@dataclass(frozen=True)
class Activations:
    encode: int
    denoise: int
    decode: int  # with the VAE options below
    decode_untiled: int  # one full-resolution decode of the whole batch, for the report


def _bytes_of(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}.get(dtype, 2)


def estimate_activations(sizes: ModelSizes, request: PlanRequest, *, tiling: bool = False,
                         slicing: bool = False) -> Activations:
    """Peak activation bytes of each stage for `request` (see `ActivationSpec` for the derivation)."""
    spec = ACTIVATIONS[sizes.family]
    family = get_family(sizes.family)
    cfg = family.uses_negative_prompt if request.cfg is None else request.cfg
    batch = request.num_images * (2 if cfg else 1)
    pixels = request.width * request.height
    den = next(iter(sizes.by_role("denoiser", "upsampler")), None)
    den_bytes = _bytes_of(den.dtype) if den else 2
    width = (den.width if den else 0) or spec.width
    heads = (den.heads if den else 0) or spec.attn_heads
    text = request.max_sequence_length or spec.text_tokens
    tokens = pixels / spec.token_stride**2 + (text if spec.text_tokens else 0)
    denoise = tokens * width * spec.live * den_bytes
    if not request.flash_attention and spec.attn_heads:
        attn_tokens = pixels / spec.attn_stride**2 + (text if spec.text_tokens else 0)
        denoise += 2 * heads * attn_tokens**2 * den_bytes
    for net in sizes.by_role("controlnet"):  # its residuals live through the denoiser's call
        denoise += tokens * width * net.residuals * den_bytes
    denoise *= batch

    encoders = sizes.by_role("text_encoder")
    enc_bytes = max((_bytes_of(c.dtype) for c in encoders), default=2)
    text_width = max((c.width for c in encoders), default=0) or spec.text_width
    text_len = max(spec.text_len, text if spec.text_tokens else 0)
    encode = batch * text_len * text_width * spec.text_live * enc_bytes if encoders else 0

    vae = next(iter(sizes.by_role("vae")), None)
    decode = untiled = 0
    if vae is not None and spec.decode_width:
        vbytes = _bytes_of(vae.dtype)
        decode_width = vae.width or spec.decode_width

        def one(px: float) -> float:
            maps = px * decode_width * spec.decode_live * vbytes
            if not request.flash_attention:
                maps += 2 * (px / spec.decode_attn_stride**2) ** 2 * vbytes
            return maps

        untiled = int(one(pixels) * request.num_images)
        tile = VAE_TILE.get(sizes.family, 1024)
        per_image = one(min(pixels, tile * tile)) + 3 * pixels * vbytes * 3 if tiling else one(pixels)
        decode = int(per_image * (1 if slicing else request.num_images))
    return Activations(int(encode), int(denoise), decode, untiled)


VAE_TILE = {"sd15": 512, "sdxl": 1024, "flux": 1024}  # AutoencoderKL's tile_sample_min_size = config.sample_size
TILING_MIN_PIXELS = 2048 * 2048  # from here on tiling is on whatever the budget (the decode dwarfs the step)
SLICING_MIN_IMAGES = 5  # batches above 4 decode one image at a time


# -------------------------------------------------------------------------------------------------------- ladder
@dataclass(frozen=True)
class Placement:
    """Where weights live. `swap`: groups of components moved to the device on demand (accelerate's
    `cpu_offload_with_hook`, the next group's hook sends the previous one back; cyclic). `group_offload`: diffusers'
    block-level group offload on every component. Offload placements need an accelerator."""

    name: str
    kind: str  # "resident", "swap", "group_offload"
    groups: tuple[tuple[str, ...], ...] = ()  # for swap: roles per group; () = one group per component
    description: str = ""


PLACEMENTS: tuple[Placement, ...] = (
    Placement("resident", "resident", description="every component on the device"),
    Placement("text_encoders_offloaded", "swap", (("text_encoder",), ("denoiser", "vae")),
              "text encoders on the device only to encode (prompt-embedding cache kept), then back to the host; "
              "denoiser and VAE stay on the device until a new prompt needs the encoders"),
    Placement("model_offload", "swap", (),
              "each component moved to the device when it runs (text encoders -> denoiser -> VAE)"),
    Placement("group_offload", "group_offload", (),
              "block-level group offload: one block group on the device at a time (CUDA: next group prefetched on "
              "a stream from pinned memory)"),
)


@dataclass(frozen=True)
class Rung:
    name: str
    placement: Placement
    storage: str = "compute"

    @property
    def lossy(self) -> bool:
        return self.storage != "compute"


def _build_ladder() -> tuple[Rung, ...]:
    rungs = [Rung(p.name, p) for p in PLACEMENTS]
    for storage in ("fp8", "int8", "nf4"):
        rungs += [Rung(f"{storage}+{p.name}", p, storage) for p in PLACEMENTS]
    return tuple(rungs)


LADDER: tuple[Rung, ...] = _build_ladder()
RUNGS: dict[str, Rung] = {r.name: r for r in LADDER}
STORAGE_DEVICES = {"nf4": ("cuda",)}  # bitsandbytes' 4-bit kernels are CUDA-only
STORAGE_PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes"}  # offered only where the package is installed


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    role: str
    params: int
    dtype: str
    storage: str
    bytes: int  # as stored under the plan
    placement: str  # "device", "swap group N", "group offload"
    device_bytes: int  # the most it holds on the device at once


@dataclass(frozen=True)
class Rejection:
    rung: str
    peak_bytes: int
    host_bytes: int
    reason: str


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen rung with its numbers, and why each richer rung was rejected."""

    rung: str
    placement: str  # Placement.kind
    storage: str
    lossy: bool
    components: tuple[ComponentPlan, ...]
    weights_bytes: int  # every weight, as stored
    resident_bytes: int  # weights that stay on the device between requests
    activation_bytes: int  # of the peak stage
    peak_bytes: int
    peak_stage: str
    host_bytes: int  # host RAM the plan keeps weights in (pinned under group offload on CUDA)
    budget: MemoryBudget
    vae_tiling: bool
    vae_slicing: bool
    request: PlanRequest
    sizes: ModelSizes = field(repr=False)
    allow_lossy: bool = False
    rejected: tuple[Rejection, ...] = ()

    @property
    def storage_dtype(self) -> str | None:
        """What the lossy rungs store weights as: "fp8" (float8_e4m3fn), "int8", "nf4"; None when lossless."""
        return self.storage if self.lossy else None

    @property
    def offloads(self) -> bool:
        return self.placement != "resident"

    def describe(self) -> list[str]:
        lines = [f"memory plan: {self.rung} for {self.sizes.model} at {self.request.describe()} — expected peak "
                 f"{format_bytes(self.peak_bytes)} ({self.peak_stage}) of {self.budget.describe()}"]
        lines.append(f"  weights {format_bytes(self.weights_bytes)} ({STORAGES[self.storage]}), "
                     f"{format_bytes(self.resident_bytes)} kept on the device, activations "
                     f"{format_bytes(self.activation_bytes)}, host RAM {format_bytes(self.host_bytes)}")
        for c in self.components:
            lines.append(f"  {c.name}: {c.params / 1e6:,.1f} M params, {c.dtype}"
                         f"{'/' + c.storage if c.storage != 'compute' else ''} {format_bytes(c.bytes)}, "
                         f"{c.placement} (on device at most {format_bytes(c.device_bytes)})")
        vae = [n for n, on in (("tiling", self.vae_tiling), ("slicing", self.vae_slicing)) if on]
        lines.append(f"  vae decode: {' + '.join(vae) if vae else 'whole images (no tiling, no slicing)'}")
        for r in self.rejected:
            lines.append(f"  rejected {r.rung}: {r.reason}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("sizes")
        out["model"] = self.sizes.model
        out["family"] = self.sizes.family
        return out


# Roles that swap with another role's group: a ControlNet runs between the denoiser's calls every step (swapping it
# separately would move both every step), an IP-Adapter's image encoder once before the loop, as the text encoders
# (diffusers' `model_cpu_offload_seq`: text encoders -> image_encoder -> denoiser).
SWAPS_WITH = {"upsampler": "denoiser", "controlnet": "denoiser", "image_encoder": "text_encoder"}


def swap_groups(placement: Placement, sizes: ModelSizes) -> list[list[ComponentSize]]:
    """Components in pipeline order, grouped by the placement's roles (an upscaler counts as the denoiser). Without
    roles, one group per component, except that ControlNets join the denoiser's group and an image encoder the
    last text encoder's."""
    order = (sizes.by_role("text_encoder") + sizes.by_role("image_encoder") + sizes.by_role("denoiser", "upsampler")
             + sizes.by_role("controlnet") + sizes.by_role("vae"))
    role = lambda c: SWAPS_WITH.get(c.role, c.role)  # noqa: E731
    if placement.groups:
        groups = [[c for c in order if role(c) in roles] for roles in placement.groups]
        return [g for g in groups if g]
    groups: list[list[ComponentSize]] = []
    for c in order:
        host = next((g for g in reversed(groups) if c.role in SWAPS_WITH and role(g[0]) == role(c)), None)
        if host is not None:
            host.append(c)
        else:
            groups.append([c])
    return groups


@dataclass(frozen=True)
class _Evaluation:
    components: tuple[ComponentPlan, ...]
    weights: int
    resident: int
    peak: int
    stage: str
    activation: int
    host: int


_STAGE = {"text_encoder": "encode", "image_encoder": "encode", "denoiser": "denoise", "upsampler": "denoise",
          "controlnet": "denoise", "vae": "decode"}
_ENCODERS = ("text_encoder", "image_encoder")


def _evaluate(rung: Rung, sizes: ModelSizes, acts: Activations, budget: MemoryBudget) -> _Evaluation:
    stored = {c.name: (c.stored(rung.storage) if c.role in LOSSY_ROLES else c.bytes) for c in sizes.components}
    storage_of = {c.name: (rung.storage if c.role in LOSSY_ROLES else "compute") for c in sizes.components}
    act = {"encode": acts.encode, "denoise": acts.denoise, "decode": acts.decode}
    total = sum(stored.values())
    kind = rung.placement.kind
    on_device: dict[str, int] = {}  # component -> device bytes while it runs (weights of everything on the device)
    placed: dict[str, tuple[str, int]] = {}
    resident = host = 0
    if kind == "resident":
        resident = total
        for c in sizes.components:
            on_device[c.name] = total
            placed[c.name] = ("device", stored[c.name])
    elif kind == "swap":
        groups = swap_groups(rung.placement, sizes)
        for i, group in enumerate(groups):
            weight = sum(stored[c.name] for c in group)
            for c in group:
                on_device[c.name] = weight
                placed[c.name] = (f"swap group {i + 1}/{len(groups)}", stored[c.name])
        resident = max((sum(stored[c.name] for c in g) for g in groups if any(c.role not in _ENCODERS for c in g)),
                       default=0)  # the denoiser's group stays between requests when prompts hit the cache
        host = total - min((sum(stored[c.name] for c in g) for g in groups), default=0)
    else:
        prefetch = budget.device_type == "cuda"
        for c in sizes.components:
            foot = min(c.group_footprint(storage_of[c.name], prefetch), stored[c.name])
            on_device[c.name] = foot
            placed[c.name] = ("group offload", foot)
        host = total
    peak, stage, activation = 0, "", 0
    for c in sizes.components:
        s = _STAGE.get(c.role, "denoise")
        need = on_device[c.name] + act[s]
        if need > peak:
            peak, stage, activation = need, s, act[s]
    plans = tuple(ComponentPlan(c.name, c.role, c.params, c.dtype, storage_of[c.name], stored[c.name],
                                placed[c.name][0], placed[c.name][1]) for c in sizes.components)
    return _Evaluation(plans, total, resident, peak + RESERVE_BYTES, stage, activation, host)


def _allowed(rung: Rung, budget: MemoryBudget, allow_lossy: bool) -> str | None:
    """Why a rung is not a candidate at all (None: it is)."""
    if rung.lossy and not allow_lossy:
        return "lossy storage not allowed (allow_lossy)"
    if rung.placement.kind != "resident" and budget.device_type == "cpu":
        return "offload needs an accelerator (the CPU holds the weights anyway)"
    devices = STORAGE_DEVICES.get(rung.storage)
    if devices and budget.device_type not in devices:
        return f"{rung.storage} needs {'/'.join(devices)}"
    package = STORAGE_PACKAGES.get(rung.storage)
    if package and not _installed(package):
        return f"{rung.storage} needs {package} (not installed)"
    return None


@functools.lru_cache(maxsize=None)
def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _vae_options(sizes: ModelSizes, request: PlanRequest) -> tuple[bool, bool]:
    return (request.width * request.height >= TILING_MIN_PIXELS, request.num_images >= SLICING_MIN_IMAGES)


def _try(rung: Rung, sizes: ModelSizes, request: PlanRequest, budget: MemoryBudget
         ) -> tuple[_Evaluation, bool, bool, Activations]:
    """Evaluate a rung with the VAE options the size asks for, then add slicing and tiling while it does not fit."""
    tiling, slicing = _vae_options(sizes, request)
    sliced = slicing or request.num_images > 1
    options = [(tiling, slicing), (tiling, sliced), (True, sliced)]
    if not sizes.by_role("vae"):
        options = [(False, False)]
    result = None
    for t, s in dict.fromkeys(options):
        acts = estimate_activations(sizes, request, tiling=t, slicing=s)
        ev = _evaluate(rung, sizes, acts, budget)
        result = (ev, t, s, acts)
        if ev.peak <= budget.device_bytes:
            break
    assert result is not None
    return result


def _fits(ev: _Evaluation, budget: MemoryBudget) -> str | None:
    if ev.peak > budget.device_bytes:
        weights = ev.peak - ev.activation - RESERVE_BYTES
        return (f"peak {format_bytes(ev.peak)} ({ev.stage}: weights {format_bytes(weights)}"
                f" + activations {format_bytes(ev.activation)} + reserve {format_bytes(RESERVE_BYTES)}) > "
                f"{format_bytes(budget.device_bytes)}")
    if budget.host_bytes is not None and budget.device_type != "cpu" and ev.host > budget.host_bytes:
        return f"host RAM {format_bytes(ev.host)} > {format_bytes(budget.host_bytes)} available"
    return None


def plan_memory(sizes: ModelSizes, request: PlanRequest, budget: MemoryBudget, *, allow_lossy: bool = False,
                start: str | None = None, below_peak: int | None = None) -> MemoryPlan:
    """The first rung of `LADDER` (from `start`, if given) that fits `budget`; raises `InsufficientMemoryError` naming
    the smallest budget any allowed rung would need. `below_peak`: only rungs expecting a lower peak (OOM fallback)."""
    rejected: list[Rejection] = []
    names = [r.name for r in LADDER]
    first = names.index(start) if start is not None else 0
    smallest: tuple[int, str, int] | None = None  # (peak, rung, host bytes) of the smallest rejected rung
    for rung in LADDER[first:]:
        why = _allowed(rung, budget, allow_lossy)
        if why is not None:
            continue
        ev, tiling, slicing, acts = _try(rung, sizes, request, budget)
        reason = _fits(ev, budget)
        if reason is None and below_peak is not None and ev.peak >= below_peak:
            reason = f"peak {format_bytes(ev.peak)} not below the failed plan's {format_bytes(below_peak)}"
        if reason is not None:
            rejected.append(Rejection(rung.name, ev.peak, ev.host, reason))
            if smallest is None or ev.peak < smallest[0]:
                smallest = (ev.peak, rung.name, ev.host)
            continue
        return _make_plan(rung, ev, tiling, slicing, sizes, request, budget, allow_lossy, rejected)
    if smallest is None:
        raise InsufficientMemoryError(f"{sizes.model}: no memory plan from {LADDER[first].name} down is allowed here "
                                      f"({budget.device_type}{'' if allow_lossy else ', lossy storage not allowed'})",
                                      budget_bytes=budget.device_bytes)
    needed, rung_name, host = smallest
    host_note = ""
    if budget.host_bytes is not None and budget.device_type != "cpu" and host > budget.host_bytes:
        host_note = f" and {format_bytes(host)} of host RAM"
    hint = ""
    if not allow_lossy:
        for r in LADDER:
            if not r.lossy or _allowed(r, budget, True) is not None:
                continue
            if _fits(_try(r, sizes, request, budget)[0], budget) is None:
                hint = f"; with allow_lossy, {r.name} would fit"
                break
    raise InsufficientMemoryError(
        f"{sizes.model} at {request.describe()}: no memory plan fits {budget.describe()}; the smallest ({rung_name}) "
        f"needs {format_bytes(needed)} of device memory{host_note}{hint}", needed_bytes=needed,
        budget_bytes=budget.device_bytes)


def _make_plan(rung: Rung, ev: _Evaluation, tiling: bool, slicing: bool, sizes: ModelSizes, request: PlanRequest,
               budget: MemoryBudget, allow_lossy: bool, rejected: Sequence[Rejection]) -> MemoryPlan:
    return MemoryPlan(rung=rung.name, placement=rung.placement.kind, storage=rung.storage, lossy=rung.lossy,
                      components=ev.components, weights_bytes=ev.weights, resident_bytes=ev.resident,
                      activation_bytes=ev.activation, peak_bytes=ev.peak, peak_stage=ev.stage, host_bytes=ev.host,
                      budget=budget, vae_tiling=tiling, vae_slicing=slicing, request=request, sizes=sizes,
                      allow_lossy=allow_lossy, rejected=tuple(rejected))


def plan_at(sizes: ModelSizes, request: PlanRequest, budget: MemoryBudget, rung_name: str) -> MemoryPlan:
    """The plan of one named rung whether or not it fits (a forced `memory_plan=`, or tests of the hooks with the
    CPU as onload device); the rungs above it are listed as passed over."""
    rung = RUNGS[rung_name]
    ev, tiling, slicing, _ = _try(rung, sizes, request, budget)
    above = [Rejection(r.name, 0, 0, f"passed over: {rung.name} was asked for") for r in LADDER[:LADDER.index(rung)]]
    return _make_plan(rung, ev, tiling, slicing, sizes, request, budget, rung.lossy, above)


def next_plan(plan: MemoryPlan, *, budget: MemoryBudget | None = None) -> MemoryPlan:
    """One rung down from `plan` (after an out-of-memory error): the next allowed rung that fits and expects a lower
    peak than `plan` did. Raises `InsufficientMemoryError` at the bottom of the ladder."""
    names = [r.name for r in LADDER]
    index = names.index(plan.rung)
    if index + 1 >= len(LADDER):
        raise InsufficientMemoryError(f"{plan.sizes.model}: {plan.rung} is the last memory plan",
                                      needed_bytes=plan.peak_bytes, budget_bytes=plan.budget.device_bytes)
    return plan_memory(plan.sizes, plan.request, budget or plan.budget, allow_lossy=plan.allow_lossy,
                       start=names[index + 1], below_peak=plan.peak_bytes)


def replan_request(plan: MemoryPlan, request: PlanRequest, sizes: ModelSizes | None = None) -> MemoryPlan:
    """The same rung for another request: new activations and VAE options (tiling/slicing toggle per request)
    without moving any weight; `sizes` the model's with the request's ControlNets / image encoder
    (`with_adjuncts`), which the rung places beside its own components. Raises `InsufficientMemoryError` when this
    rung cannot serve it."""
    rung = RUNGS[plan.rung]
    sizes = sizes or plan.sizes
    ev, tiling, slicing, _ = _try(rung, sizes, request, plan.budget)
    reason = _fits(ev, plan.budget)
    adjuncts = [c.name for c in sizes.components if c.role in ADJUNCT_ROLES]
    what = f" with {', '.join(adjuncts)}" if adjuncts else ""
    if reason is not None:
        raise InsufficientMemoryError(f"{plan.sizes.model} at {request.describe()}{what} with plan {plan.rung}: "
                                      f"{reason}", needed_bytes=ev.peak, budget_bytes=plan.budget.device_bytes)
    return replace(plan, components=ev.components, weights_bytes=ev.weights, resident_bytes=ev.resident,
                   host_bytes=ev.host, activation_bytes=ev.activation, peak_bytes=ev.peak, peak_stage=ev.stage,
                   vae_tiling=tiling, vae_slicing=slicing, request=request, sizes=sizes)


def needs_reload(old: MemoryPlan, new: MemoryPlan) -> bool:
    """Lossy storage rewrites weights in place (diffusers cannot undo layerwise casting; quantization neither):
    going from one storage to another needs the weights read again."""
    return old.storage != new.storage and old.lossy


def plan_for_model(model: str, *, max_memory: int | str | None = None, device: torch.device | str = "cuda",
                   width: int | None = None, height: int | None = None, num_images: int = 1,
                   dtype: DtypeRule | str = torch.bfloat16, allow_lossy: bool = False, cfg: bool | None = None,
                   max_host_memory: int | str | None = None, flash_attention: bool = True) -> MemoryPlan:
    """Plan a registry id or folder without loading it (what `engine plan` prints). Sizes default to the model's."""
    from ..errors import ModelNotFoundError
    from ..registry import find_spec

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidRequestError("dtype", f"unknown dtype {dtype!r}", ", ".join(DTYPES))
        dtype = DTYPES[dtype]
    sizes = size_model(model, dtype)
    if sizes is None:
        raise ModelNotFoundError(model, "cannot be sized from configs alone (not a registry id, diffusers folder or "
                                 "cached hub snapshot)")
    spec = find_spec(model)
    d = spec.defaults if spec is not None else None
    if spec is not None and spec.family_spec.task == "upscale":
        # AuraSR runs 64x64 input tiles into 256x256 outputs in batches (auto-sized from free memory by its
        # pipeline): plan one batch of 8 output tiles (its noise chunk), whatever the image size.
        width, height, num_images = 256, 256, max(num_images, 8)
    width = width or (d.width if d and d.width else 1024)
    height = height or (d.height if d and d.height else 1024)
    if cfg is None and d is not None and d.guidance_scale is not None and d.guidance_scale <= 1.0:
        cfg = False
    if device == "cuda" and max_memory is None and not torch.cuda.is_available():
        raise InvalidRequestError("max_memory", "no CUDA device here to measure; give the budget", "e.g. 24GB")
    budget = detect_budget(device, max_memory, max_host_memory)
    if max_host_memory is None and max_memory is not None:
        budget = replace(budget, host_bytes=None)  # a what-if plan for another machine: its RAM is unknown
    request = PlanRequest(width, height, num_images, cfg=cfg, flash_attention=flash_attention,
                          max_sequence_length=d.max_sequence_length if d else None)
    return plan_memory(sizes, request, budget, allow_lossy=allow_lossy)


# ---------------------------------------------------------------------------------------------------------- table
TABLE_MODELS = ("sd15", "sdxl", "flux-dev", "flux-schnell")
TABLE_CARDS_GB = (8, 12, 16, 24, 48, 80)


def plan_table(models: Sequence[str] = TABLE_MODELS, cards_gb: Sequence[int] = TABLE_CARDS_GB, *,
               dtype: str = "bf16", allow_lossy: bool = False,
               max_host_memory: int | str | None = None) -> list[list[str]]:
    """Rows of "which plan each model gets on common cards" (header first); each cell `rung (peak, host RAM)`."""
    rows = [["model (default size)", *[f"{gb} GB" for gb in cards_gb]]]
    for model in models:
        row = []
        size = None
        for gb in cards_gb:
            try:
                plan = plan_for_model(model, max_memory=f"{gb}GB", dtype=dtype, allow_lossy=allow_lossy,
                                      max_host_memory=max_host_memory)
                host = f", host {format_bytes(plan.host_bytes)}" if plan.host_bytes else ""
                row.append(f"{plan.rung} ({format_bytes(plan.peak_bytes)}{host})")
                size = plan.request.describe()
            except InsufficientMemoryError as e:
                row.append(f"does not fit (needs {format_bytes(e.needed_bytes or 0)})")
        rows.append([f"{model} ({size or '?'})", *row])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
