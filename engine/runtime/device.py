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
