"""The on-disk artifact cache: one root (ENGINE_CACHE_DIR) for compiled graphs and exported engines.

torch.compile's own caches (inductor's FX graph cache, AOTAutograd's cache, Triton kernels) are pointed under the
root, in a folder keyed by the library versions and device, so a restarted process reuses compiled work.
Other artifacts (ONNX files, TensorRT engines) take `artifact_key(...)`, a hash of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..paths import cache_dir


def library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace(" ", "-")
        return f"cuda-{name}-sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    return device.type


def artifact_key(*, weights: str, config_hash: str, shapes: Any, device: torch.device, extra: Any = None) -> str:
    """Hash of (weights identity, config, shapes, library versions, device, anything else the artifact needs)."""
    payload = json.dumps({"weights": weights, "config": config_hash, "shapes": shapes, "versions": library_versions(),
                          "device": device_tag(device), "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def weights_identity(source: str) -> str:
    """Identity of a model's weights: its path with the size and mtime of its weight files (cheap, no hashing)."""
    path = Path(source)
    if not path.exists():
        return source
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return json.dumps([(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files])


def compile_cache_dir(device: torch.device) -> Path:
    tag = "-".join(f"{k}{v}" for k, v in library_versions().items()).replace("+", "_")
    return cache_dir() / "compiled" / f"{tag}-{device_tag(device)}"


def use_compile_cache(device: torch.device) -> Path:
    """Point torch.compile's caches under the artifact root, unless the user chose another place (theirs wins).

    Some libraries export torch's default location into the environment at import, so a value equal to that
    default counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = compile_cache_dir(device)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path
