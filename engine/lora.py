"""LoRA adapters: fetched from a path, URL or hub id, cached by content hash, applied through diffusers' LoRA loaders
(which read diffusers/PEFT and kohya key formats), switched per request, fused when a set stays stable, and
hot-swapped on compiled models without recompiling.

Exactness: adapters live in PEFT layers beside the untouched base weights, so "no LoRA" runs the base model
bit-for-bit; fusing snapshots the base weights it overwrites and restores them on unfuse.

Fused projections: PEFT injects into the separate q/k/v layers, which a model with fused projections (fuse_qkv pass)
no longer calls, so loading the first adapter splits the fused weights back (`unfuse_qkv`); the model then runs
unfused. A compiled model gets its slots before compiling (compiler pass lora_slots), already unfused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidRequestError, ModelLoadError, RefusedSourceError
from .families import get_family
from .loading.stock import build_stock_pipeline
from .paths import cache_dir, file_sha256
from .requests import MAX_LORAS, LoraSpec  # noqa: F401 - re-exported: the request schema, resolved here
from .sources import parse_hub_ref

if TYPE_CHECKING:
    from .net import Download

log = logging.getLogger(__name__)

MAX_LORA_BYTES = 2_000_000_000
EMPTY = ""  # the content hash of a prepared slot that holds no LoRA yet


@dataclass(frozen=True)
class ResolvedLora:
    sha256: str
    file: Path
    scale: float


def _keep(download: "Download") -> Path:
    """Move a streamed download under the cache, named by its hash (a second download of the same file is free)."""
    target = cache_dir() / "loras" / f"{download.sha256}.safetensors"
    if target.is_file():
        download.path.unlink(missing_ok=True)
    else:
        os.replace(download.path, target)
    return target


def _check_safetensors(path: Path, field: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise InvalidRequestError(field, f"{path.name}: holds no tensors")
    except InvalidRequestError:
        raise
    except Exception as e:
        raise InvalidRequestError(field, f"{path.name}: not a readable safetensors file ({type(e).__name__})") from None


def resolve_lora(spec: LoraSpec, index: int, *, allow_private_urls: bool = False) -> ResolvedLora:
    """Find the adapter's file (downloading it if needed) and identify it by content hash.

    Trusted callers (the Python API): a local file, an http(s) URL, or a hub file. Untrusted callers (see
    `loading.caller_policy`): an http(s) URL or a hub file only; a path is refused with the same text whether or
    not it exists, and a hub file must be cached unless hub downloads are allowed."""
    from .loading import caller_policy

    policy = caller_policy()
    field = f"loras.{index}.path"
    path = spec.path.strip()
    if path.startswith(("http://", "https://")):
        from .net import download

        fetched = download(path, cache_dir() / "loras", field=field, max_bytes=MAX_LORA_BYTES, timeout_s=300,
                           allow_private=allow_private_urls if policy.trusted else policy.allow_private_urls)
        sha, file = fetched.sha256, _keep(fetched)
    elif not policy.trusted:
        if "://" in path or _hub_lora(path) is None:
            raise RefusedSourceError(field, "must be an http(s) URL or a hub file",
                                     "URL, owner/name[/file.safetensors]")
        file = _from_hub(path, field, download=policy.allow_hub_downloads, caller_trusted=False)
        sha = file_sha256(file)
    elif Path(path).expanduser().is_file():
        file = Path(path).expanduser().resolve()
        if file.suffix != ".safetensors":
            raise InvalidRequestError(field, f"{file.name}: only .safetensors LoRA files are loaded (pickle files "
                                      "can run code)", ".safetensors")
        sha = file_sha256(file)
    elif "://" in path or path.startswith((".", "/", "~")) or path.endswith(".safetensors") and not _hub_lora(path):
        raise InvalidRequestError(field, f"no such file: {path}")
    elif _hub_lora(path):
        file = _from_hub(path, field)
        sha = file_sha256(file)
    else:
        raise InvalidRequestError(field, f"{path!r} is not a file, an http(s) URL or a hub id")
    _check_safetensors(file, field)
    return ResolvedLora(sha256=sha, file=file, scale=spec.scale)


def _hub_lora(path: str) -> tuple[str, str | None] | None:
    """(repo, file) of a hub LoRA reference: owner/name (its default weights file) or owner/name/file.safetensors."""
    return parse_hub_ref(path, file_suffix=".safetensors")


def _check_hub_file_size(repo: str, name: str, field: str) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, name), str):
        return
    size = get_hf_file_metadata(hf_hub_url(repo, name), timeout=30).size
    if size is None or size > MAX_LORA_BYTES:
        raise InvalidRequestError(field, f"{name} of hub repository {repo} is {size} bytes, over the limit",
                                  f"at most {MAX_LORA_BYTES} bytes")


def _from_hub(path: str, field: str, download: bool = True, caller_trusted: bool = True) -> Path:
    from huggingface_hub import hf_hub_download

    ref = _hub_lora(path)
    assert ref is not None
    repo, name = ref[0], ref[1] or "pytorch_lora_weights.safetensors"
    try:
        if download and not caller_trusted:  # a remote caller's download: capped before a byte is fetched
            _check_hub_file_size(repo, name, field)
        return Path(hf_hub_download(repo, name, local_files_only=not download))
    except InvalidRequestError:
        raise
    except Exception as e:
        if not download:
            raise RefusedSourceError(field, f"{name} of hub repository {repo} is not in this server's cache, and "
                                     "hub downloads are off for remote callers (engine serve --allow-hub-downloads)"
                                     ) from None
        raise InvalidRequestError(field, f"could not fetch {name} from hub repository {repo} "
                                  f"({type(e).__name__}); pass a local file or URL instead") from None


class LoraManager:
    """The adapters of one loaded model. Not thread-safe by itself: the engine calls it under its device lock."""

    def __init__(self, family: str, components: dict[str, Any], *, hotswap_rank: int | None, fuse_after: int,
                 max_cached: int = 8):
        self.pipe = build_stock_pipeline(family, components)
        self.denoiser = components[get_family(family).denoiser]
        # Adapters already in the denoiser before any LoRA are the empty slots the lora_slots pass prepared for
        # compiling; LoRAs are hot-swapped into them.
        self.prepared = tuple(getattr(self.denoiser, "peft_config", None) or ())
        self.hotswap = hotswap_rank is not None or bool(self.prepared)
        self.hotswap_rank = hotswap_rank
        self.fuse_after = fuse_after
        self.max_cached = max_cached
        self.loaded: dict[str, str] = {}  # adapter name -> sha256 of its file
        self.active: tuple[tuple[str, float], ...] = ()  # (sha256, scale) of the last applied set
        self.streak = 0
        self.fused = False
        self._snapshot: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.swaps = 0
        self.recompiling_loads = 0  # adapters a compiled model had to take outside its slots
        self._refuse = False  # fuse q/k/v again when the adapters are gone
        for slot in self.prepared:
            self.loaded[slot] = EMPTY

    # -- public ----------------------------------------------------------------------------------------------------
    def apply(self, loras: list[ResolvedLora]) -> None:
        wanted = tuple((lo.sha256, lo.scale) for lo in loras)
        if wanted == self.active:
            self.streak += 1
            if self.fuse_after and not self.fused and not self.hotswap and wanted and self.streak >= self.fuse_after:
                self._fuse()
            return
        self._unfuse()
        self.streak = 1
        try:
            if loras and self._unfuse_projections():
                log.info("split the fused q/k/v projections back: adapters are injected into them")
            if self.hotswap:
                self._apply_slots(loras)
            else:
                self._apply_named(loras)
        except InvalidRequestError:
            self._reset_after_failure()
            raise
        except Exception as e:
            self._reset_after_failure()
            raise ModelLoadError(f"LoRA could not be applied ({type(e).__name__}: {e})") from e
        self.active = wanted

    def _unfuse_projections(self) -> int:
        from .compiler.layout import unfuse_qkv  # the compiler imports this module (request schemas)

        split = unfuse_qkv(self.denoiser)
        # An eager model is fused again once its adapters are unloaded (a compiled one keeps the layout it was
        # compiled with: its slots sit on the separate layers).
        self._refuse = self._refuse or bool(split and not self.hotswap)
        return split

    def unload(self) -> None:
        """Remove every adapter: the base model is exactly what it was before any LoRA. Prepared slots stay (a
        compiled model keeps its code) with zero weights and scale, which adds exactly nothing."""
        self._unfuse()
        extra = [n for n in self.loaded if n not in self.prepared]
        if self.prepared:
            for name in extra:
                self.pipe.delete_adapters(name)
            self._zero_slots()
        elif self.loaded:
            self.pipe.unload_lora_weights()
        if self._refuse and not self._lora_layers():
            from .compiler.layout import fuse_qkv

            fuse_qkv(self.denoiser)
            self._refuse = False
        self.loaded = {slot: EMPTY for slot in self.prepared}
        self.active = ()
        self.streak = 0

    def _zero_slots(self) -> None:
        with torch.no_grad():
            for layer in self._lora_layers():
                for slot in self.prepared:
                    if slot in layer.lora_B:
                        layer.lora_B[slot].weight.zero_()
                    if isinstance(layer.scaling.get(slot), torch.Tensor):
                        layer.scaling[slot].fill_(0.0)

    # -- named adapters (eager models): cached, selected with set_adapters ------------------------------------------
    def _name(self, sha: str) -> str:
        return f"lora_{sha[:16]}"

    def _load(self, lora: ResolvedLora, name: str, index: int, hotswap: bool = False) -> None:
        before = self._adapter_layers(name)
        try:
            self.pipe.load_lora_weights(str(lora.file), adapter_name=name, hotswap=hotswap)
        except Exception as e:  # shape mismatch, unknown key format, rank above the hot-swap target...
            raise InvalidRequestError(f"loras.{index}.path", f"{lora.file.name} does not fit this model "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
        if not hotswap and self._adapter_layers(name) == before:
            self.pipe.delete_adapters(name) if name in self._all_adapters() else None
            raise InvalidRequestError(f"loras.{index}.path", f"{lora.file.name} matches no layer of this model "
                                      "(a LoRA for another architecture?)")
        self.loaded[name] = lora.sha256

    def _apply_named(self, loras: list[ResolvedLora]) -> None:
        if not loras:
            if self.loaded:
                self.pipe.disable_lora()
            return
        names = []
        for i, lora in enumerate(loras):
            name = self._name(lora.sha256)
            if name not in self.loaded:
                self._load(lora, name, i)
            names.append(name)
        self._evict(keep=set(names))
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[lo.scale for lo in loras])

    def _evict(self, keep: set[str]) -> None:
        for name in [n for n in self.loaded if n not in keep][: max(0, len(self.loaded) - self.max_cached)]:
            self.pipe.delete_adapters(name)
            del self.loaded[name]

    # -- slots (compiled models): hot-swapped in place, unused slots at scale 0 --------------------------------------
    def _apply_slots(self, loras: list[ResolvedLora]) -> None:
        for i, lora in enumerate(loras):
            slot = f"slot{i}"
            if self.loaded.get(slot) == lora.sha256:
                continue
            if slot in self.loaded:
                try:
                    self._load(lora, slot, i, hotswap=True)
                    self.swaps += 1
                    continue
                except InvalidRequestError as e:
                    # The slot cannot take it (layers outside the slot, a rank above it, other alphas): load it
                    # afresh in the slot's place; correct, but the compiled code recompiles once.
                    log.warning("LoRA %s cannot be hot-swapped into %s (%s); loading it afresh (recompiles)",
                                lora.file.name, slot, e)
                    if slot in self._all_adapters():
                        self.pipe.delete_adapters(slot)
                    del self.loaded[slot]
            self._load_new_slot(lora, slot, i)
        slots = sorted(self.loaded)
        if not slots:
            return
        scales = {f"slot{i}": lo.scale for i, lo in enumerate(loras)}
        self._set_slot_scales(slots, [scales.get(s, 0.0) for s in slots])

    def _load_new_slot(self, lora: ResolvedLora, slot: str, index: int) -> None:
        """An adapter in a slot that did not exist: padded to the hot-swap rank with its scaling in a tensor, so
        later swaps into it do not recompile (this load does)."""
        padded = self.hotswap_rank is not None and hasattr(self.denoiser, "enable_lora_hotswap")
        if padded:
            self.denoiser.enable_lora_hotswap(target_rank=self.hotswap_rank, check_compiled="ignore")
        try:
            self._load(lora, slot, index)
        except InvalidRequestError:
            if not padded:
                raise
            # e.g. a rank above the hot-swap rank: take it unpadded (later swaps into this slot reload it)
            if slot in self._all_adapters():
                self.pipe.delete_adapters(slot)
            self.denoiser._prepare_lora_hotswap_kwargs = None
            self._load(lora, slot, index)
        finally:
            if hasattr(self.denoiser, "_prepare_lora_hotswap_kwargs"):
                self.denoiser._prepare_lora_hotswap_kwargs = None  # never applies to a later, unrelated load
        self.recompiling_loads += 1

    def _set_slot_scales(self, slots: list[str], weights: list[float]) -> None:
        """`set_adapters`, keeping each layer's scaling the tensor it was made for compiled hot-swapping.

        PEFT's `set_scale` stores a Python float, which replaces the tensor `prepare_model_for_compiled_hotswap`
        put there; compiled code then guards on the float's value and recompiles when a new scale comes. So the
        new value is written into the old tensor in place instead."""
        layers = self._lora_layers()
        tensors = {(id(layer), name): value for layer in layers for name, value in layer.scaling.items()
                   if isinstance(value, torch.Tensor)}
        self.pipe.set_adapters(slots, adapter_weights=weights)
        with torch.no_grad():
            for layer in layers:
                for name, value in list(layer.scaling.items()):
                    tensor = tensors.get((id(layer), name))
                    if tensor is not None and not isinstance(value, torch.Tensor):
                        tensor.fill_(float(value))
                        layer.scaling[name] = tensor

    # -- fusing -----------------------------------------------------------------------------------------------------
    def _lora_layers(self) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = []
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                layers += [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        return layers

    def _adapter_layers(self, name: str) -> int:
        return sum(1 for layer in self._lora_layers() if name in getattr(layer, "lora_A", {}))

    def _all_adapters(self) -> set[str]:
        return {a for adapters in self.pipe.get_list_adapters().values() for a in adapters}

    def _fuse(self) -> None:
        layers = self._lora_layers()
        stored = [type(w).__name__ for w in (layer.get_base_layer().weight for layer in layers)
                  if not (type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point())]
        if stored:  # GGUF blocks, torchao tensors: merging would write float deltas into quantized storage
            self.fuse_after = 0
            log.info("not fusing LoRAs: base weights are stored quantized (%s)", stored[0])
            return
        self._snapshot = {}
        for layer in layers:
            weight = layer.get_base_layer().weight
            self._snapshot[weight] = weight.detach().clone()
        names = [n for n in self.loaded if n in self.pipe.get_active_adapters()]
        try:
            self.pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        except Exception as e:  # leave the adapters unmerged (still correct), and stop trying
            with torch.no_grad():
                for weight, original in self._snapshot.items():
                    weight.copy_(original)
            self._snapshot = {}
            self.fuse_after = 0
            log.warning("could not fuse LoRA set %s (%s: %s); it stays unmerged", names, type(e).__name__, e)
            return
        self.fused = True
        log.info("fused LoRA set %s into the weights", names)

    def _unfuse(self) -> None:
        if not self.fused:
            return
        self.pipe.unfuse_lora()
        with torch.no_grad():
            for weight, original in self._snapshot.items():
                weight.copy_(original)  # unmerging subtracts in floating point; the snapshot makes it exact
        self._snapshot = {}
        self.fused = False

    def _reset_after_failure(self) -> None:
        """A failed load leaves no half-applied state: back to the previously active set, or none."""
        try:
            self.unload()
        except Exception:  # pragma: no cover - best effort; the error that matters is re-raised by the caller
            log.exception("could not unload LoRAs after a failure")
