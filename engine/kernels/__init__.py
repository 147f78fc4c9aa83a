"""Triton kernels for the hot spots inductor leaves, as torch custom ops, each with its PyTorch reference.

One module per kernel (`group_norm_silu`, `layer_norm_modulate`, `rms_norm_rope`): a Triton kernel registered with
`torch.library.custom_op` (a fake implementation gives torch.compile the output's shape, so compiled graphs keep the
op without a graph break) and the plain PyTorch function it must equal. `modules.py` swaps diffusers' modules for
engine subclasses that call the ops, and back (`apply_kernels` / `remove_kernels`); the compiler's `kernels` pass
(engine/compiler/kernels.py) decides when.

`custom_op` rather than `triton_op`: `triton_op` lets inductor see into the kernel, but under TRITON_INTERPRET=1 on
a CPU (how these kernels are tested) its tracing reads the data pointer of fake tensors and fails (torch 2.13); an
opaque custom op compiles the same way on every device.

Importing this package never imports triton: the engine runs without it, and the pass says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .runtime import interpreting, triton_installed, unavailable_reason

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KernelSpec:
    name: str  # torch.ops.engine_kernels.<name>, and the module engine.kernels.<name>
    replaces: str  # what runs eagerly instead, and where
    reference: str  # the PyTorch function in the module the kernel must equal


KERNELS: dict[str, KernelSpec] = {k.name: k for k in (
    KernelSpec("group_norm_silu", "GroupNorm + SiLU in diffusers' ResnetBlock2D (UNet, VAE); NCHW and channels-last",
               "group_norm_silu_reference"),
    KernelSpec("layer_norm_modulate", "LayerNorm * (1 + scale) + shift in FLUX's AdaLayerNormZero(/Single) and "
               "AdaLayerNormContinuous", "layer_norm_modulate_reference"),
    KernelSpec("rms_norm_rope", "RMSNorm of q and k + rotary embedding in FLUX's attention", "rms_norm_rope_reference"),
)}


def apply_kernels(model: "torch.nn.Module", kernels: frozenset[str] | None = None) -> dict[str, Any]:
    """Swap `model`'s modules for the fused ones (needs triton); returns per kernel where (modules.KernelUse)."""
    from .modules import apply_kernels as _apply

    return _apply(model, kernels)


def remove_kernels(model: "torch.nn.Module") -> int:
    """Put the library modules back; returns how many were restored (0 when triton, hence no kernel, is absent)."""
    if not triton_installed():
        return 0
    from .modules import remove_kernels as _remove

    return _remove(model)


__all__ = ["KERNELS", "KernelSpec", "apply_kernels", "interpreting", "remove_kernels", "triton_installed",
           "unavailable_reason"]
