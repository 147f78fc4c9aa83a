"""`CompileConfig`: the typed description of how a pipeline is optimized, and the optimization levels.

Levels (configs/opt_levels.yaml) expand into explicit fields; `compute_hash()` of the resolved config keys compiled
artifacts on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidRequestError
from ..paths import configs_dir
from ..requests import invalid_from_validation

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Attention = Literal["default", "auto", "native", "flash", "sage", "xformers", "_native_cudnn", "_native_efficient",
                    "_native_flash", "_native_math", "flex"]
Cache = Literal["none", "auto", "first_block", "taylorseer", "mag"]
Quant = Literal["none", "auto", "int8_weight_only", "int8_dynamic", "fp8"]
Toggle = Literal["auto", True, False]


class CompileConfig(BaseModel):
    """Every optimization decision, explicit. See configs/opt_levels.yaml for the presets O0..O3."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Dtype = "fp32"
    vae_dtype: Literal["safe", "fp32", "same"] = "safe"  # safe: fp32 where half precision overflows (fp16 + upcast VAEs)
    text_encoder_dtype: Literal["same", "fp32"] = "same"
    attention: Attention = "default"
    attention_allow_lossy: bool = False  # "auto" may pick SageAttention (int8 Q/K: lossy); only O3 allows it
    fuse_qkv: bool = False
    channels_last: bool = False
    # engine/kernels Triton ops (GroupNorm+SiLU, LayerNorm+adaLN, RMSNorm+RoPE) swapped into the denoiser and VAE;
    # "auto": on CUDA. True forces them (on a CPU only under TRITON_INTERPRET=1: tests)
    kernels: Toggle = False
    cache: Cache = "none"
    cache_threshold: float = Field(default=0.08, gt=0.0, le=1.0)
    quant: Quant = "none"
    compile: bool = False
    compile_vae: bool = False
    compile_fullgraph: bool = True
    compile_dynamic: bool = True  # symbolic sizes: a new resolution in the same bucket reuses the graph
    compile_mode: str | None = None  # torch.compile mode; None: the plan picks it (engine/compiler/plan.py)
    compile_autotune: bool = False  # max-autotune where shapes are static (CUDA): minutes of tuning, faster kernels
    inductor_tuning: bool = False  # flux-fast's inductor flags on CUDA, scoped around compiled calls
    recompile_limit: int = Field(default=8, ge=1, le=64)  # graphs per compiled function (static: one per resolution)
    cuda_graphs: Toggle = False  # only around the whole denoiser with static shapes, never with the step cache
    prompt_cache_size: int = Field(default=0, ge=0, le=100_000)
    # Compiled models prepare a LoRA hot-swap slot (unfused q/k/v + a zero adapter of `lora_hotswap_rank`), so no LoRA
    # ever recompiles; False keeps the fused projections and the memory (~0.7 GB on FLUX-dev) for deployments that
    # serve no LoRAs (a first LoRA then loads without a slot and recompiles once).
    lora_slots: bool = True
    lora_hotswap_rank: int = Field(default=64, ge=1, le=1024)  # compiled models pre-allocate LoRA slots this large
    lora_fuse_after: int = Field(default=3, ge=0)  # fuse a LoRA set into the weights after N uses in a row (0: never)
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"  # runtime of the denoiser and VAE decoder
    # Several devices for one request (compiler pass `parallel`): "auto" picks from what this process sees (CFG-parallel
    # for UNets on 2 GPUs, FLUX context parallel under torchrun); "off" keeps one device. `parallel_devices` forces
    # CFG-parallel onto these two devices (the first is the engine's), e.g. ("cuda:0", "cuda:2"), or ("cpu", "cpu")
    # to exercise the split and the worker thread without GPUs. "context" | "ulysses" | "ring" force FLUX context
    # parallelism over every rank of the torch.distributed group (torchrun), also on CPU ranks (gloo: Ulysses only).
    parallel: Literal["auto", "off", "context", "ulysses", "ring"] = "auto"
    parallel_devices: tuple[str, str] | None = None

    @field_validator("parallel_devices")
    @classmethod
    def _known_devices(cls, value: tuple[str, str] | None) -> tuple[str, str] | None:
        if value is not None:
            import torch

            for name in value:
                try:
                    torch.device(name)
                except (RuntimeError, TypeError) as e:
                    raise ValueError(f"{name!r} is not a torch device ({e})") from None
        return value

    def compute_hash(self) -> str:
        """Stable hash of the fields (keys compiled artifacts together with device and library versions)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_overrides(self, **fields: Any) -> "CompileConfig":
        try:
            return CompileConfig.model_validate({**self.model_dump(), **fields})
        except ValidationError as e:
            raise invalid_from_validation(e, CompileConfig) from None


@functools.lru_cache(maxsize=None)
def _levels(path: str) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def level_names() -> list[str]:
    return list(_levels(str(configs_dir() / "opt_levels.yaml")))


def config_for_level(level: str, **overrides: Any) -> CompileConfig:
    """Expand an optimization level into an explicit config, then apply overrides."""
    levels = _levels(str(configs_dir() / "opt_levels.yaml"))
    if level not in levels:
        raise InvalidRequestError("opt_level", f"unknown optimization level {level!r}", ", ".join(levels), level)
    try:
        return CompileConfig.model_validate({**levels[level], **overrides})
    except ValidationError as e:
        raise invalid_from_validation(e, CompileConfig) from None


def resolve_config(opt_level: str | None, compile_config: CompileConfig | dict[str, Any] | None,
                   default_level: str) -> CompileConfig:
    """An explicit CompileConfig wins; a dict overrides fields of the level; otherwise the level alone."""
    if isinstance(compile_config, CompileConfig):
        return compile_config
    return config_for_level(opt_level or default_level, **(compile_config or {}))
