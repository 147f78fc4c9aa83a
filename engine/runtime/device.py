"""Device selection and capabilities."""

from __future__ import annotations

from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class DeviceCaps:
    """What the compiler's decisions depend on, as data: built from the real device by `device_caps`, or written by
    hand (see `simulated_caps`) so that the plan for a T4, an A100, an L4 or an H100 can be tested on a CPU."""

    type: str  # "cuda", "cpu", "mps"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    bf16: bool = False  # native bf16 arithmetic (not emulated)
    attention_backends: frozenset[str] = frozenset({"native"})  # diffusers attention backends usable here
    name: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def at_least(self, capability: tuple[int, int]) -> bool:
        return self.capability is not None and self.capability >= capability

    def describe(self) -> str:
        if self.capability is None:
            return self.type
        return f"{self.type} sm_{self.capability[0]}{self.capability[1]}"


def _cuda_bf16(device: torch.device) -> bool:
    """Native bf16 only: compute capability >= 8.0 (Ampere). `is_bf16_supported()` alone also counts emulation,
    which would pick a slow, emulated bf16 on a T4/V100 instead of fp16 with its safety rules."""
    if torch.version.hip:
        return True
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _cpu_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_caps(device: torch.device, attention_backends: frozenset[str] = frozenset({"native"})) -> DeviceCaps:
    """The capabilities of a real device (the attention backends installed are the compiler's to probe)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return DeviceCaps("cuda", torch.cuda.get_device_capability(device), _cuda_bf16(device), attention_backends,
                          torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return DeviceCaps("cpu", None, _cpu_bf16(), attention_backends, "cpu")
    return DeviceCaps(device.type, None, False, attention_backends, device.type)


# Named stand-ins for tests and planning: a GPU of each generation the rules distinguish, and a CPU.
SIMULATED: dict[str, DeviceCaps] = {
    "cpu": DeviceCaps("cpu", None, True, frozenset({"native"}), "cpu (bf16 via oneDNN)"),
    "sm_75": DeviceCaps("cuda", (7, 5), False, frozenset({"native"}), "Turing (T4)"),
    "sm_80": DeviceCaps("cuda", (8, 0), True, frozenset({"native", "_native_cudnn", "flash", "sage"}), "Ampere (A100)"),
    "sm_89": DeviceCaps("cuda", (8, 9), True, frozenset({"native", "_native_cudnn", "flash", "sage"}), "Ada (L4)"),
    "sm_90": DeviceCaps("cuda", (9, 0), True, frozenset({"native", "_native_cudnn", "flash", "_flash_3", "sage"}),
                        "Hopper (H100)"),
}


def simulated_caps(name: str, **changes: object) -> DeviceCaps:
    """One of `SIMULATED`, with fields replaced (e.g. `attention_backends=frozenset({"native"})`)."""
    return replace(SIMULATED[name], **changes)  # type: ignore[arg-type]


def supports_bf16(device: torch.device | DeviceCaps) -> bool:
    caps = device if isinstance(device, DeviceCaps) else device_caps(device)
    return caps.bf16


def best_half_dtype(device: torch.device | DeviceCaps) -> torch.dtype | None:
    """bf16 where the hardware has it natively (CUDA >= 8.0, oneDNN CPUs; fp32's range, so no overflow), fp16 on older
    GPUs and MPS (with the fp16 safety rules of the dtype pass), None where half precision would be slower."""
    caps = device if isinstance(device, DeviceCaps) else device_caps(device)
    if caps.bf16:
        return torch.bfloat16
    if caps.type in ("cuda", "mps"):
        return torch.float16
    return None
