"""quant pass (lossy): torchao weight quantization of the denoiser's linear layers, as the plan chose it.

int8 weight-only and dynamic int8 run on any device; fp8 (dynamic activations and weights, flux-fast's recipe) needs
CUDA compute capability 8.9 (Ada, Hopper). "auto" takes fp8 where it can, else dynamic int8 on CUDA; on other devices
it skips, and an explicit kind still quantizes: on a CPU with native bf16 both int8 paths were measured slower than
bf16 (one eager small-SDXL UNet forward at 256 px, 1 thread: int8 weight-only 1.26x, dynamic int8 2.52x the bf16
time; benchmarks/quant_speed.py, benchmarks/results/quant_cpu.md; compiled int8 and CPUs without native bf16 not
measured). The pass runs before compile, which then fuses the (de)quantization into the matmuls.
"""

from __future__ import annotations

from typing import Any

from .context import PassContext
from .plan import plan_of


def _torchao_config(kind: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {"int8_weight_only": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
            "fp8": Float8DynamicActivationFloat8WeightConfig}[kind]()


def _is_linear(module: Any, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features >= 16 and module.out_features >= 16


def apply_quant(ctx: PassContext) -> None:
    plan = plan_of(ctx)
    kind, note = plan.quant, plan.quant_note
    if kind is None:
        ctx.report.skipped("quant", note)
        return
    try:
        from torchao.quantization import quantize_
    except ImportError:
        ctx.report.skipped("quant", "torchao is not installed (pip install torchao)")
        return
    model = ctx.denoiser
    from ..runtime.memory import is_prequantized

    if is_prequantized(model):
        ctx.report.skipped("quant", f"{kind}: {type(model).__name__} was loaded quantized (GGUF / NF4); its weights "
                           "are not quantized twice")
        return
    count = sum(1 for fqn, m in model.named_modules() if _is_linear(m, fqn))
    quantize_(model, _torchao_config(kind), filter_fn=_is_linear)
    ctx.state["quant"] = kind
    ctx.report.applied("quant", f"{kind} on {type(model).__name__} linear layers ({count} quantized)"
                       + (f"; {note}" if note else ""))
