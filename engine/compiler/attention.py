"""attention pass: pick the fastest attention backend the device and installed kernels allow, through diffusers'
attention-backend API, with a fallback to PyTorch's native SDPA.

Only models whose attention goes through diffusers' dispatcher (the FLUX transformer) can switch backends; the
UNet's classic attention processors call PyTorch SDPA directly, which already selects flash / memory-efficient
kernels on CUDA, so for them the pass reports what runs instead of pretending to change it.
"""

from __future__ import annotations

import torch

from ..runtime.device import cuda_capability
from .context import PassContext

# Tried in order for "auto": (backend, minimum CUDA capability, dtypes it accepts)
AUTO_ORDER_CUDA = [
    ("_flash_3_hub", (9, 0), (torch.bfloat16, torch.float16)),
    ("flash", (8, 0), (torch.bfloat16, torch.float16)),
    ("sage", (8, 0), (torch.bfloat16, torch.float16)),
    ("_native_cudnn", (8, 0), (torch.bfloat16, torch.float16)),
    ("native", (0, 0), (torch.bfloat16, torch.float16, torch.float32)),
]


def _uses_dispatcher(model: torch.nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin

    return any(isinstance(m, AttentionModuleMixin) for m in model.modules())


def _backend_available(name: str) -> tuple[bool, str]:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name.endswith("_hub"):
        return False, "hub kernels need a download"
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except Exception as e:  # missing package or too-old version
        return False, str(e).splitlines()[0]
    return True, ""


def _choose(ctx: PassContext) -> tuple[str, list[str]]:
    """The backend for "auto", and why the better ones were passed over."""
    passed: list[str] = []
    cap = cuda_capability(ctx.device)
    if cap is None:
        return "native", [f"device is {ctx.device.type}: native SDPA"]
    dtype = ctx.state.get("dtype", torch.float32)
    for name, min_cap, dtypes in AUTO_ORDER_CUDA:
        if cap < min_cap:
            passed.append(f"{name}: needs compute capability {min_cap[0]}.{min_cap[1]}")
            continue
        if dtype not in dtypes:
            passed.append(f"{name}: needs half precision")
            continue
        ok, why = _backend_available(name)
        if ok:
            return name, passed
        passed.append(f"{name}: {why}")
    return "native", passed


def apply_attention(ctx: PassContext) -> None:
    requested = ctx.config.attention
    if requested == "default":
        ctx.report.skipped("attention", "default attention requested")
        return
    model = ctx.denoiser
    if not _uses_dispatcher(model):
        ctx.report.skipped("attention", f"{type(model).__name__} calls PyTorch SDPA directly (AttnProcessor2_0), "
                                        "which picks its kernel per device; no backend to switch")
        return
    if requested == "auto":
        backend, passed = _choose(ctx)
    else:
        ok, why = _backend_available(requested)
        backend, passed = (requested, []) if ok else ("native", [f"{requested}: {why}"])
    model.set_attention_backend(backend)
    note = f"; passed over: {'; '.join(passed)}" if passed else ""
    ctx.report.applied("attention", f"{type(model).__name__} -> {backend}{note}")
