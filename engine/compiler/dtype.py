"""dtype pass: the denoiser (and by default the text encoders) in half precision where the device supports it.

The dtypes are decided before loading (`dtype_policy`), and the loaders read every component straight into its
dtype: a 12 B-parameter FLUX transformer is never materialised in fp32 on the host or the device. The pass itself
then only checks and reports (and casts components that were handed over in another dtype, e.g. by a caller that
built them itself).

The VAE stays in fp32 when it would overflow: VAEs flagged `force_upcast` (SDXL's, FLUX's) produce inf/NaN in fp16.
bf16 has fp32's range, so with bf16 the VAE follows the compute dtype. T5 overflows in fp16 too and stays fp32 then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..runtime.device import best_half_dtype
from .config import CompileConfig
from .context import PassContext

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BY_NAME = {v: k for k, v in NAMES.items()}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def compute_dtype(config: CompileConfig, device: torch.device) -> torch.dtype:
    """The denoiser's dtype: the configured one, or for "auto" the device's fast half precision (fp32 if none)."""
    if config.dtype != "auto":
        return BY_NAME[config.dtype]
    return best_half_dtype(device) or torch.float32


@dataclass(frozen=True)
class DtypePolicy:
    """Which dtype each component is loaded in; callable as the loaders' `torch_dtype(name, class_name, config)`."""

    compute: torch.dtype
    vae_dtype: str = "safe"  # CompileConfig.vae_dtype
    text_encoder_dtype: str = "same"  # CompileConfig.text_encoder_dtype
    nf4_components: tuple[str, ...] = ()  # loaded as bitsandbytes NF4 (a memory plan's lossy storage)

    def quantization(self, name: str, library: str, class_name: str) -> Any:
        """The `quantization_config` a component is loaded with: NF4 weights are made by bitsandbytes while loading
        (they cannot be produced afterwards), so an NF4 memory plan asks the loaders for them."""
        if name not in self.nf4_components:
            return None
        import importlib

        config_class = importlib.import_module(library).BitsAndBytesConfig  # diffusers' or transformers'
        return config_class(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.compute)

    def __call__(self, name: str, class_name: str, config: Mapping[str, Any] | None = None) -> torch.dtype:
        config = config or {}
        if self.compute == torch.float32:
            return torch.float32
        if name == "vae":
            if self.vae_dtype == "fp32" or (self.vae_dtype == "safe" and self.compute == torch.float16
                                            and bool(config.get("force_upcast", False))):
                return torch.float32
            return self.compute
        if name in TEXT_ENCODERS:
            if self.text_encoder_dtype == "fp32" or (self.compute == torch.float16 and class_name.startswith("T5")):
                return torch.float32
        return self.compute


def dtype_policy(config: CompileConfig, device: torch.device) -> DtypePolicy:
    return DtypePolicy(compute_dtype(config, device), config.vae_dtype, config.text_encoder_dtype)


def _module_config(module: torch.nn.Module) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def apply_dtype(ctx: PassContext) -> None:
    policy = ctx.state.get("dtype_policy") or dtype_policy(ctx.config, ctx.device)
    dtype = policy.compute
    ctx.state["dtype"] = dtype
    if dtype == torch.float32 and all(_floating_dtype(m) in (None, torch.float32) for _, m in
                                      ctx.modules(ctx.family.denoiser, "vae", *TEXT_ENCODERS)):
        reason = "fp32 requested" if ctx.config.dtype == "fp32" else f"no fast half precision on {ctx.device.type}"
        ctx.report.skipped("dtype", f"{reason}; everything stays fp32")
        return
    done, cast = [], []
    for name, module in ctx.modules(ctx.family.denoiser, "vae", *TEXT_ENCODERS):
        wanted = policy(name, type(module).__name__, _module_config(module))
        if _floating_dtype(module) != wanted:
            module.to(wanted)
            cast.append(name)
        done.append(f"{name} {NAMES[wanted]}")
    how = f"; cast after loading: {', '.join(cast)}" if cast else "; loaded in these dtypes"
    ctx.report.applied("dtype", ", ".join(done) + how)
