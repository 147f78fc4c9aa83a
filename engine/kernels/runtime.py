"""Where the Triton kernels can run: triton installed, and a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1,
Triton's interpreter, which is how the kernels are tested without a GPU).

Nothing here imports triton at module import: the engine works without it (the kernels pass then reports
"skipped: triton not installed").
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels in Triton's numpy interpreter on CPU tensors. Triton reads it when a kernel is
    decorated (at import of a kernel module), so it must be set before the first kernel module is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on `device`, or None when they can."""
    if not triton_installed():
        return "triton not installed (pip install 'engine[kernels]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"device is {device.type}: Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU, for tests)"


def check_device(*tensors: torch.Tensor) -> None:
    """Called by each op before launching: a clear error instead of Triton's on a tensor it cannot address."""
    for t in tensors:
        why = unavailable_reason(t.device)
        if why is not None:
            raise RuntimeError(f"engine kernel on {t.device}: {why}")


def rows_per_program(block: int) -> int:
    """Rows a row-wise kernel (LayerNorm, RMSNorm) handles per program: a tile of about 4K elements on a GPU (one
    FLUX token of 3072, 32 heads of 128), far more in the interpreter, which runs programs one by one in numpy."""
    budget = 1 << 16 if interpreting() else 1 << 12
    return max(1, budget // block)
