"""quant pass (lossy): torchao weight quantization of the denoiser's linear layers.

int8 weight-only and dynamic int8 run on any device; fp8 (dynamic activations and weights) needs CUDA compute
capability 8.9 (Ada, Hopper). "auto" takes fp8 where it can, else dynamic int8 on CUDA; on other devices it skips
(there the int8 kernels were slower than bf16), and an explicit kind still quantizes.
"""

from __future__ import annotations

from typing import Any

from ..runtime.device import cuda_capability
from .context import PassContext


def _torchao_config(kind: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {"int8_weight_only": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
            "fp8": Float8DynamicActivationFloat8WeightConfig}[kind]()


def _resolve(ctx: PassContext) -> tuple[str | None, str]:
    kind = ctx.config.quant
    cap = cuda_capability(ctx.device)
    fp8_ok = cap is not None and cap >= (8, 9)
    if kind == "auto":
        if fp8_ok:
            return "fp8", ""
        if cap is not None:
            return "int8_dynamic", "fp8: needs CUDA compute capability >= 8.9"
        # Measured (benchmarks/results/compiler_cpu.md): torchao's int8 paths on a CPU run slower than the bf16
        # matmuls O1 already picks, so "auto" (the O3 level) leaves the weights alone there.
        return None, (f"auto on {ctx.device.type}: int8 kernels are slower than bf16 matmuls here (fp8 needs CUDA "
                      "compute capability >= 8.9); set quant='int8_weight_only' or 'int8_dynamic' to quantize anyway")
    if kind == "fp8" and not fp8_ok:
        where = f"compute capability {cap[0]}.{cap[1]}" if cap else f"device is {ctx.device.type}"
        return None, f"fp8: needs CUDA compute capability >= 8.9 ({where})"
    return kind, ""


def _is_linear(module: Any, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features >= 16 and module.out_features >= 16


def apply_quant(ctx: PassContext) -> None:
    if ctx.config.quant == "none":
        ctx.report.skipped("quant", "disabled in config")
        return
    kind, note = _resolve(ctx)
    if kind is None:
        ctx.report.skipped("quant", note)
        return
    try:
        from torchao.quantization import quantize_
    except ImportError:
        ctx.report.skipped("quant", "torchao is not installed (pip install torchao)")
        return
    model = ctx.denoiser
    count = sum(1 for fqn, m in model.named_modules() if _is_linear(m, fqn))
    quantize_(model, _torchao_config(kind), filter_fn=_is_linear)
    ctx.state["quant"] = kind
    ctx.report.applied("quant", f"{kind} on {type(model).__name__} linear layers ({count} quantized)"
                       + (f"; {note}" if note else ""))
