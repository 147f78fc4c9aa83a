"""lora_slots pass: LoRA hot-swap slots in the denoiser before it is compiled, so the first LoRA a compiled model
receives is swapped into code that already runs it (no recompile), as every later one is.

A slot is a PEFT LoRA adapter of rank `lora_hotswap_rank` with zero weights on every linear layer of the repeated
blocks (the regions `compile` compiles), its scaling held in a tensor (peft's `prepare_model_for_compiled_hotswap`).
Until a LoRA arrives its contribution is an exact zero. The slots sit on the separate q/k/v projections, so a denoiser
the fuse_qkv pass fused is split back first: a compiled model that takes LoRAs runs unfused projections.
Runs before the backend pass (placement and export capture the final modules) and after quant (a quantized denoiser
gets no slots: peft cannot hot-swap into quantized layers).
"""

from __future__ import annotations

import torch

from .context import PassContext
from .layout import quantized_projection, unfuse_qkv

SLOT = "slot0"  # engine/lora.py swaps the first adapter of a request into it


def slot_targets(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the model's repeated blocks (the regionally compiled code)."""
    kinds = set(getattr(model, "_repeated_blocks", None) or ())
    targets = []
    for name, block in model.named_modules():
        if type(block).__name__ not in kinds:
            continue
        targets += [f"{name}.{sub}" for sub, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    return targets


def apply_lora_slots(ctx: PassContext) -> None:
    if not ctx.config.lora_slots:
        ctx.report.skipped("lora_slots", "disabled in config (lora_slots=False): projections stay fused; a first "
                           "LoRA loads without a slot and recompiles")
        return
    if not ctx.config.compile:
        ctx.report.skipped("lora_slots", "not compiled: adapters are injected when a request brings one")
        return
    if ctx.config.backend != "torch":
        ctx.report.skipped("lora_slots", f"the {ctx.family.denoiser} is exported to {ctx.config.backend}, which "
                           "cannot take LoRA adapters")
        return
    stored = quantized_projection(ctx.denoiser)
    if stored:
        ctx.report.skipped("lora_slots", f"the denoiser's weights are stored quantized ({stored}): a LoRA loads "
                           "without slots and recompiles")
        return
    if ctx.state.get("quant"):
        ctx.report.skipped("lora_slots", f"{ctx.state['quant']}-quantized denoiser: peft cannot hot-swap into "
                           "quantized layers (a LoRA loads without slots and recompiles)")
        return
    model = ctx.denoiser
    if not hasattr(model, "add_adapter"):
        ctx.report.skipped("lora_slots", f"{type(model).__name__} does not take PEFT adapters")
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        ctx.report.skipped("lora_slots", "peft is not installed")
        return
    if getattr(model, "peft_config", None):
        ctx.report.skipped("lora_slots", "the denoiser already holds adapters")
        return
    from peft import LoraConfig
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    if not slot_targets(model):
        ctx.report.skipped("lora_slots", f"{type(model).__name__} has no repeated blocks with linear layers")
        return
    split = unfuse_qkv(model)
    targets = slot_targets(model)  # the separate q/k/v layers again, where LoRAs are injected
    rank = ctx.config.lora_hotswap_rank
    # init_lora_weights=True: lora_B starts at zero, so the slot adds exactly nothing until a LoRA is swapped in.
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True),
                      adapter_name=SLOT)
    prepare_model_for_compiled_hotswap(model, target_rank=rank, config=model.peft_config, check_compiled="error")
    ctx.state["lora_slots"] = [SLOT]
    note = f"; {split} fused projections split back into q/k/v" if split else ""
    ctx.report.applied("lora_slots", f"{SLOT}: rank {rank} on {len(targets)} linear layers of "
                       f"{type(model).__name__}'s repeated blocks{note}")
