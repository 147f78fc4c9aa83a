"""Load a diffusers-layout folder, or a hub id resolved to such a folder.

The folder's model_index.json says which class each component is; classes are taken only from the allow-list in
`classes.py`. Weights are read from safetensors by diffusers/transformers `from_pretrained`, which builds each model
on the meta device and assigns the mmapped tensors (no second copy in memory). Pickle weights (`.bin`, `.ckpt`) are
refused unless the caller opts in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import HubUnavailableError, ModelLoadError, UnsafeCheckpointError
from ..families import FamilySpec, family_of_pipeline_class
from ..sources import PICKLE_SUFFIXES
from .classes import component_kind, resolve_class
from .dtypes import TorchDtype, component_dtype, folder_config, load_quantization

log = logging.getLogger(__name__)

# What a hub snapshot needs: configs, tokenizers and safetensors weights (never pickles, ONNX or Flax files).
HUB_ALLOW_PATTERNS = ["model_index.json", "*.json", "*.txt", "*.model", "*/*.json", "*/*.txt", "*/*.model",
                      "*/*.safetensors", "*/*.safetensors.index.json"]
HUB_IGNORE_PATTERNS = ["*.fp16.safetensors", "*.bf16.safetensors", "*/*.fp16.safetensors", "*/*.bf16.safetensors",
                       "*.onnx", "*.msgpack", "*.ckpt", "*.bin", "*.pt"]


def read_model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder}: not a diffusers folder (no model_index.json)")
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index}: unreadable ({e})") from None


def folder_family(folder: Path) -> FamilySpec:
    index = read_model_index(folder)
    cls_name = index.get("_class_name", "")
    family = family_of_pipeline_class(cls_name)
    if family is None:
        raise ModelLoadError(f"{folder}: pipeline class {cls_name!r} is not a supported family (SD 1.5, SDXL, FLUX)")
    return family


def _check_weights(folder: Path, name: str, allow_pickle: bool) -> None:
    sub = folder / name
    if not sub.is_dir():
        raise ModelLoadError(f"{folder}: component folder {name!r} is missing")
    files = [p.name for p in sub.iterdir()]
    has_safe = any(f.endswith(".safetensors") for f in files)
    has_pickle = any(f.endswith(PICKLE_SUFFIXES) for f in files)
    if not has_safe and has_pickle and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{sub}: weights are pickle files, which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
    if not has_safe and not has_pickle:
        raise ModelLoadError(f"{sub}: no weights file (*.safetensors) found")


def _load_component(folder: Path, name: str, library: str, cls_name: str, torch_dtype: TorchDtype,
                    allow_pickle: bool) -> Any:
    kind = component_kind(library, cls_name)
    if kind is None:
        raise ModelLoadError(f"{folder}: component {name!r} has class {library}.{cls_name}, which this engine does not load")
    cls = resolve_class(library, cls_name)
    if kind == "scheduler":
        return cls.from_pretrained(str(folder), subfolder=name)
    if kind == "tokenizer":
        return cls.from_pretrained(str(folder / name), local_files_only=True)
    _check_weights(folder, name, allow_pickle)
    use_safetensors = not allow_pickle or any((folder / name).glob("*.safetensors"))
    dtype = component_dtype(torch_dtype, name, cls_name, folder_config(folder / name))
    quant = load_quantization(torch_dtype, name, library, cls_name)
    extra = {"quantization_config": quant} if quant is not None else {}
    # Both libraries build on the meta device and load each tensor straight into `dtype` (no fp32 copy first).
    if library == "diffusers":
        model = cls.from_pretrained(str(folder), subfolder=name, torch_dtype=dtype, local_files_only=True,
                                    use_safetensors=use_safetensors, low_cpu_mem_usage=True, **extra)
    else:
        model = cls.from_pretrained(str(folder / name), dtype=dtype, local_files_only=True,
                                    use_safetensors=use_safetensors, **extra)
    model.eval()
    model.requires_grad_(False)
    return model


def load_folder(folder: Path, *, torch_dtype: TorchDtype = torch.float32, allow_pickle: bool = False,
                only: set[str] | None = None) -> dict[str, Any]:
    """Load the components of the folder's family (or just `only`), each on the CPU in `torch_dtype` (one dtype,
    or a per-component policy)."""
    folder = Path(folder)
    family = folder_family(folder)
    index = read_model_index(folder)
    parts: dict[str, Any] = {}
    for name in family.components:
        if only is not None and name not in only:
            continue
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise ModelLoadError(f"{folder}: model_index.json has no component {name!r}, which {family.name} needs")
        try:
            parts[name] = _load_component(folder, name, entry[0], entry[1], torch_dtype, allow_pickle)
        except (ModelLoadError, UnsafeCheckpointError):
            raise
        except Exception as e:  # corrupted safetensors, bad config, shape mismatch: name the component
            raise ModelLoadError(f"{folder}: cannot load component {name!r} ({type(e).__name__}: {e})") from e
    return parts


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub repository, if one is complete enough to load (no network)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS,
                                      local_files_only=True))
    except Exception:
        return None
    return path if (path / "model_index.json").is_file() else None


def fetch_hub_model(repo_id: str) -> Path:
    """Resolve a hub id to a local folder: the cache first, then a download; a clear error when neither works."""
    local = cached_snapshot(repo_id)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS))
    except Exception as e:
        reason = type(e).__name__
        raise HubUnavailableError(
            repo_id,
            f"could not fetch it from the Hugging Face hub ({reason}) and it is not in the local cache; "
            "pass a local diffusers folder or a single .safetensors file instead",
        ) from None
    if not (path / "model_index.json").is_file():
        raise HubUnavailableError(repo_id, "the hub repository is not a diffusers pipeline (no model_index.json)")
    return path
