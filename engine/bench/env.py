"""The environment a benchmark ran in: library versions, device, CPU model, cores and bf16 support, threads, the
machine's load, git commit. A number without it can't be reproduced or compared."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """Read-only git queries in the repository the package lives in; None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return device.type


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` runs bf16 natively, with what says so. On a CPU without AVX-512-bf16 / AMX, oneDNN emulates
    bf16 and a stock bf16 pipeline is no faster than fp32, so it is not the baseline a user would pick there."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() is {ok}"
    if device.type == "cpu":
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return ok, (f"oneDNN bf16 {'supported' if ok else 'not supported (no AVX-512-bf16 / AMX: emulated)'} on "
                    f"this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported(), capability "
                    f"{torch.backends.cpu.get_cpu_capability()})")
    return False, f"no bf16 check for {device.type}"


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared machine shows here (and in the spread of the runs)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 / int8 speed (AVX-512 bf16 / VNNI, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx512_bf16", "avx512_vnni", "avx512f", "amx_bf16", "amx_tile", "avx2")
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def environment(device: torch.device) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    bf16, bf16_detail = native_bf16(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "native_bf16": bf16,
        "native_bf16_detail": bf16_detail,
        "load_average_start": load_average(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "engine": _version("engine"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit is not None and dirty is not None else None,
    }
