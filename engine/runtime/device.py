"""Device selection and capabilities."""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """"auto" picks CUDA when present, then Apple MPS, else the CPU; anything else must name an available device."""
    if isinstance(spec, torch.device):
        device = spec
    elif spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as e:
            raise InvalidRequestError("device", f"{spec!r} is not a device ({e})", "auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", "CUDA was requested but is not available on this machine", "auto, cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidRequestError("device", f"there is no CUDA device {device.index}", f"0..{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidRequestError("device", "MPS was requested but is not available", "auto, cpu")
    return device


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def best_half_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where supported (no overflow), fp16 on older GPUs and MPS, None where half precision would be slower."""
    if supports_bf16(device):
        return torch.bfloat16
    if device.type in ("cuda", "mps"):
        return torch.float16
    return None
