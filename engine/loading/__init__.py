"""Resolve a `model` argument (registry id, diffusers folder, single file, hub id) to loaded components."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ModelLoadError, ModelNotFoundError, RefusedSourceError
from ..families import FamilySpec, get_family
from ..registry import ModelSpec, find_spec, get_spec, registry
from ..sources import CHECKPOINT_SUFFIXES, HUB_ID, is_hub_id  # noqa: F401 - is_hub_id re-exported
from .dtypes import TorchDtype
from .pretrained import cached_snapshot, fetch_hub_model, folder_family, load_folder, read_model_index

log = logging.getLogger(__name__)

MAX_HUB_DOWNLOAD_BYTES = 40_000_000_000  # an untrusted caller's hub download (SDXL fp32 is ~14 GB, FLUX ~34 GB)
SINGLE_FILE_SUFFIXES = CHECKPOINT_SUFFIXES


# -- who is asking -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallerPolicy:
    """What the current caller may name. The Python `Engine` API is trusted (local paths, any hub id). Untrusted
    callers (HTTP, the fal-style service unless trusted=True) name registry ids or hub ids (owner/name) only; a hub
    id must already be in the local HF cache unless `allow_hub_downloads`. `allow_models`, when not empty, is the
    operator's allow-list: only those names; an allow-listed hub id is still never read as a local folder, but may be
    downloaded (the operator named it). `pinned` are the models the operator mapped to the endpoint being called:
    loaded exactly as a trusted caller would name them. Every untrusted hub download is capped (`max_hub_bytes`)."""

    trusted: bool = True
    allow_models: frozenset[str] = frozenset()
    allow_hub_downloads: bool = False
    allow_private_urls: bool = False
    max_hub_bytes: int = MAX_HUB_DOWNLOAD_BYTES  # cap on one hub download for an untrusted caller
    pinned: frozenset[str] = frozenset()

    def with_pinned(self, *names: str) -> "CallerPolicy":
        return dataclasses.replace(self, pinned=self.pinned | frozenset(names))


TRUSTED = CallerPolicy()
_CALLER: contextvars.ContextVar[CallerPolicy] = contextvars.ContextVar("engine_caller", default=TRUSTED)


def caller_policy() -> CallerPolicy:
    """The policy of the caller this thread (or task) is working for; trusted unless `as_caller` says otherwise."""
    return _CALLER.get()


@contextlib.contextmanager
def as_caller(policy: CallerPolicy) -> Iterator[None]:
    token = _CALLER.set(policy)
    try:
        yield
    finally:
        _CALLER.reset(token)


def hub_snapshot_bytes(repo_id: str) -> int:
    """What `fetch_hub_model` would download for `repo_id` (the files its patterns select), from the hub's listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    from .pretrained import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS

    info = HfApi().model_info(repo_id, files_metadata=True, timeout=30)
    files = filter_repo_objects(info.siblings or [], allow_patterns=HUB_ALLOW_PATTERNS,
                                ignore_patterns=HUB_IGNORE_PATTERNS, key=lambda f: f.rfilename)
    return sum(f.size or 0 for f in files)


def _download_for_untrusted(model: str, policy: CallerPolicy) -> Path:
    """A hub snapshot an untrusted caller asked for, downloaded only when its listed size is under the cap."""
    try:
        size = hub_snapshot_bytes(model)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: the same answer as a failed download
        raise RefusedSourceError("model_name", f"hub repository {model!r} is not in this server's model cache and "
                                 f"its size could not be read from the hub ({type(e).__name__})") from None
    if size > policy.max_hub_bytes:
        raise RefusedSourceError("model_name", f"hub repository {model!r} is {size} bytes, over this server's "
                                 "download limit", f"at most {policy.max_hub_bytes} bytes")
    return fetch_hub_model(model)


UNTRUSTED_MODEL = "must be a registry id or a hub repository id (owner/name)"


def check_untrusted_model(name: str, policy: CallerPolicy, field: str = "model_name") -> str:
    """How an untrusted caller's model name is served: "pinned" (the operator's endpoint mapping), "allowed" (the
    operator's allow-list), "registry", or "hub" (in the local cache, or downloads allowed). Otherwise a
    `RefusedSourceError` (422) whose text depends on the name only, never on what exists on this machine's disk."""
    if policy.trusted:
        return "trusted"
    if name in policy.pinned:
        return "pinned"
    if name in policy.allow_models:
        return "allowed"
    if policy.allow_models:
        raise RefusedSourceError(field, "this server serves only the models it allows", ", ".join(sorted(
            policy.allow_models)))
    if find_spec(name) is not None:
        return "registry"
    if not is_hub_id(name):
        raise RefusedSourceError(field, UNTRUSTED_MODEL, "ids from `engine models`, owner/name")
    if not policy.allow_hub_downloads and cached_snapshot(name) is None:
        raise RefusedSourceError(field, f"hub repository {name!r} is not in this server's model cache, and hub "
                                 "downloads are off for remote callers (engine serve --allow-hub-downloads)")
    return "hub"


@dataclass
class LoadedModel:
    """A model ready to build pipelines from: its family, components (on the CPU until placed), defaults."""

    key: str
    family: FamilySpec
    components: dict[str, Any]
    spec: ModelSpec  # the registry entry, or the family's reference entry for defaults when loaded from a path
    source: str
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    local: bool = False  # named by a local path (a trusted caller's): never served to an untrusted one


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _defaults_spec(family: FamilySpec, components: dict[str, Any]) -> ModelSpec:
    """Defaults for a model given by path: those of the registry's reference model of its family."""
    reference = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux-dev"}[family.name]
    transformer = components.get("transformer")
    if transformer is not None and not transformer.config.guidance_embeds:
        reference = "flux-schnell"
    return get_spec(reference)


def _pipeline_config(folder: Path) -> dict[str, Any]:
    index = read_model_index(folder)
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def _from_folder(key: str, folder: Path, spec: ModelSpec | None, dtype: TorchDtype, allow_pickle: bool) -> LoadedModel:
    family = folder_family(folder)
    components = load_folder(folder, torch_dtype=dtype, allow_pickle=allow_pickle)
    return LoadedModel(key=key, family=family, components=components,
                       spec=spec or _defaults_spec(family, components), source=str(folder),
                       pipeline_config=_pipeline_config(folder))


def _config_folder(config: str) -> tuple[Path, ModelSpec | None]:
    """A `config` argument (registry id or diffusers-layout folder) as a folder of architecture configs."""
    spec = find_spec(config)
    if spec is None:
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(config, "config must be a registry id or a diffusers folder with model_index.json",
                                     known=text_to_image_ids())
        return folder.resolve(), None
    if spec.is_tiny:
        return _spec_folder(spec), spec
    from ..paths import configs_dir

    arch = configs_dir() / "arch" / (spec.arch or "")
    return (arch if spec.arch and arch.is_dir() else fetch_hub_model(spec.source)), spec


def _from_single_file(key: str, path: Path, dtype: TorchDtype, allow_pickle: bool,
                      config: str | None) -> LoadedModel:
    from .gguf import is_gguf, load_gguf
    from .single_file import load_single_file

    candidates, config_spec, pipeline_config = None, None, {}
    if config is not None:
        folder, config_spec = _config_folder(config)
        candidates, pipeline_config = [folder], _pipeline_config(folder)
    load = load_gguf if is_gguf(path) else load_single_file  # GGUF: a quantized FLUX transformer (diffusers' GGUF)
    family_name, components = load(path, candidates=candidates, allow_pickle=allow_pickle, torch_dtype=dtype)
    family = get_family(family_name)
    spec = config_spec if config_spec is not None and config_spec.family == family.name else None
    return LoadedModel(key=key, family=family, components=components,
                       spec=spec or _defaults_spec(family, components), source=str(path),
                       pipeline_config=pipeline_config)


def _from_preset(spec: ModelSpec, dtype: TorchDtype, allow_pickle: bool) -> LoadedModel:
    """A distilled preset: its base model, with a replacement UNet loaded and/or a LoRA fused in."""
    from safetensors.torch import load_file

    from .hub_files import fetch_file
    from .stock import build_stock_pipeline

    base = get_spec(spec.base or "")
    loaded = _from_folder(spec.id, _spec_folder(base), base, dtype, allow_pickle)
    parts = [base.id]
    if spec.unet:
        denoiser = loaded.components[loaded.family.denoiser]
        try:
            denoiser.load_state_dict(load_file(fetch_file(spec.unet)), strict=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise ModelLoadError(f"{spec.id}: UNet weights {spec.unet} do not fit {base.id} ({e})") from None
        parts.append(f"unet {spec.unet}")
    if spec.lora:
        pipe = build_stock_pipeline(loaded.family.name, loaded.components)
        pipe.load_lora_weights(str(fetch_file(spec.lora)), adapter_name="preset")
        pipe.fuse_lora(lora_scale=spec.lora_scale)
        pipe.unload_lora_weights()  # the fused deltas stay in the weights; the adapter layers go
        parts.append(f"lora {spec.lora} x{spec.lora_scale}")
    loaded.spec = spec
    loaded.source = " + ".join(parts)
    return loaded


def _spec_folder(spec: ModelSpec) -> Path:
    if spec.is_tiny:
        from .tiny import ensure_tiny_model

        return ensure_tiny_model(spec.tiny_config or "")
    return fetch_hub_model(spec.source)


def load_model(model: str, *, torch_dtype: TorchDtype = torch.float32, allow_pickle: bool = False,
               config: str | None = None) -> LoadedModel:
    """Load `model`: a registry id, a local diffusers folder, a single checkpoint file, or a hub id.

    `config` (registry id or folder) names the architecture of a single file whose shapes match no shipped config.
    """
    _quiet_progress_bars()
    policy = caller_policy()
    how = check_untrusted_model(model, policy)
    if how in ("hub", "allowed") and find_spec(model) is None and is_hub_id(model):
        # Never a local path, whatever the name looks like: the hub cache (or a capped download, when allowed) only.
        folder = cached_snapshot(model)
        if folder is None and (policy.allow_hub_downloads or how == "allowed"):
            folder = _download_for_untrusted(model, policy)
        if folder is None:  # evicted from the cache since the check
            raise RefusedSourceError("model_name", f"hub repository {model!r} is not in this server's model cache")
        return _from_folder(model, folder, None, torch_dtype, allow_pickle)
    spec = find_spec(model)
    if spec is not None:
        if spec.family_spec.task != "text-to-image":
            raise ModelNotFoundError(model, f"is a {spec.family_spec.task} model; use Engine.upscale",
                                     known=text_to_image_ids())
        if spec.is_preset:
            return _from_preset(spec, torch_dtype, allow_pickle)
        return _from_folder(model, _spec_folder(spec), spec, torch_dtype, allow_pickle)
    path = Path(model).expanduser()
    if path.is_dir():
        return dataclasses.replace(_from_folder(model, path.resolve(), None, torch_dtype, allow_pickle), local=True)
    if path.is_file():
        return dataclasses.replace(_from_single_file(model, path.resolve(), torch_dtype, allow_pickle, config),
                                   local=True)
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_SUFFIXES) or "\\" in model
    if looks_like_path:
        raise ModelNotFoundError(model, "no such file or folder", known=text_to_image_ids())
    if HUB_ID.match(model):
        folder = fetch_hub_model(model)
        return _from_folder(model, folder, None, torch_dtype, allow_pickle)
    raise ModelNotFoundError(model, "not a registered id, an existing path, or a hub id (owner/name)",
                             known=text_to_image_ids())


def text_to_image_ids() -> list[str]:
    return sorted(k for k, s in registry().items() if s.family_spec.task == "text-to-image")


def available_offline(spec: ModelSpec) -> bool:
    """Whether `spec` loads without the network: tiny models always; hub models when a snapshot is already in the local
    HF cache; presets when their base and their extra files (local, or cached hub files) are."""
    if spec.is_preset:
        return available_offline(get_spec(spec.base or "")) and all(
            _file_available(ref) for ref in (spec.unet, spec.lora) if ref)
    if spec.is_tiny:
        return True
    if spec.family_spec.task == "upscale":
        from .aurasr import cached_aurasr_snapshot

        return cached_aurasr_snapshot(spec.source) is not None
    return cached_snapshot(spec.source) is not None


def _file_available(ref: str) -> bool:
    """A preset's extra file: a local path, or a hub file already in the local cache."""
    from .hub_files import cached_hub_file

    return Path(ref).expanduser().is_file() or cached_hub_file(ref) is not None
