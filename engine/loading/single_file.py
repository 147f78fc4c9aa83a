"""Load original-layout single-file checkpoints (A1111/ComfyUI SD 1.5 and SDXL, BFL FLUX transformer).

1. The file's keys are matched against a table of layouts (`LAYOUTS`): data, not if/elif.
2. The architecture is not guessed from the keys: each candidate diffusers-layout config folder (`arch_candidates`)
   is built on the meta device, the file's tensor shapes (read from the header, nothing loaded) are converted to
   diffusers keys, and the first candidate whose keys and shapes all agree wins.
3. The chosen components are built on the meta device and receive the mmapped tensors with
   `load_state_dict(assign=True)`, so a cold start costs the disk read and nothing more.
Components the file does not hold (tokenizers, scheduler; everything but the transformer for FLUX) come from the
chosen candidate folder, or from the registry model's hub cache when that folder ships configs only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..errors import HubUnavailableError, ModelLoadError, UnsafeCheckpointError
from ..families import get_family
from ..paths import configs_dir
from ..registry import registry
from ..sources import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .classes import component_kind, resolve_class
from .dtypes import TorchDtype, component_dtype, module_config
from .original_layout import flux_bfl_to_diffusers
from .pretrained import HUB_IGNORE_PATTERNS, folder_family, load_folder, read_model_index
from .tiny import ensure_tiny_model

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------ layout table


@dataclass(frozen=True)
class FilePart:
    """One component inside a single file: its keys start with one of `prefixes` (the first that holds `marker`)."""

    component: str  # diffusers component name
    prefixes: tuple[str, ...]
    marker: str  # a key (after the prefix) every checkpoint of this part has
    converter: str  # name in CONVERTERS


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    family: str
    required: tuple[str, ...]  # regexes: each must match some key
    forbidden: tuple[str, ...]  # regexes: none may match (tells look-alike layouts apart)
    parts: tuple[FilePart, ...]

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [p for p in self.required if not any(re.search(p, k) for k in keys)]

    def conflicts(self, keys: Sequence[str]) -> list[str]:
        return [p for p in self.forbidden if any(re.search(p, k) for k in keys)]

    def matches(self, keys: Sequence[str]) -> bool:
        return not self.missing(keys) and not self.conflicts(keys)


_UNET = FilePart("unet", ("model.diffusion_model.",), "input_blocks.0.0.weight", "ldm_unet")
_VAE = FilePart("vae", ("first_stage_model.",), "encoder.conv_in.weight", "ldm_vae")
_CLIP_MARKER = "text_model.embeddings.token_embedding.weight"

LAYOUTS: tuple[LayoutSpec, ...] = (
    LayoutSpec(
        name="sd15-ldm",
        family="sd15",
        required=(r"^model\.diffusion_model\.input_blocks\.0\.0\.weight$",),
        forbidden=(
            r"^model\.diffusion_model\.label_emb\.",  # SDXL's added conditioning
            r"^conditioner\.",  # SDXL text encoders
            r"^cond_stage_model\.model\.",  # SD 2.x (OpenCLIP-H)
        ),
        parts=(_UNET, _VAE, FilePart("text_encoder", ("cond_stage_model.transformer.",), _CLIP_MARKER, "clip")),
    ),
    LayoutSpec(
        name="sdxl-sgm",
        family="sdxl",
        required=(
            r"^model\.diffusion_model\.input_blocks\.0\.0\.weight$",
            r"^model\.diffusion_model\.label_emb\.0\.0\.weight$",
        ),
        forbidden=(
            r"^conditioner\.embedders\.0\.model\.",  # the SDXL refiner (OpenCLIP only)
            r"^cond_stage_model\.",
        ),
        parts=(
            _UNET,
            _VAE,
            FilePart("text_encoder", ("conditioner.embedders.0.transformer.",), _CLIP_MARKER, "clip"),
            FilePart("text_encoder_2", ("conditioner.embedders.1.model.",), "token_embedding.weight", "open_clip"),
        ),
    ),
    LayoutSpec(
        name="flux-bfl",
        family="flux",
        required=(
            r"^(model\.diffusion_model\.)?double_blocks\.0\.img_attn\.qkv\.weight$",
            r"^(model\.diffusion_model\.)?single_blocks\.0\.linear1\.weight$",
            r"^(model\.diffusion_model\.)?img_in\.weight$",
        ),
        forbidden=(r"^(model\.diffusion_model\.)?single_stream_modulation\.",),  # FLUX.2
        parts=(FilePart("transformer", ("model.diffusion_model.", ""), "img_in.weight", "bfl_flux"),),
    ),
)


def detect_layout(keys: Iterable[str]) -> LayoutSpec:
    """The one layout in `LAYOUTS` the keys match; otherwise a ModelLoadError listing what was looked for."""
    keys = list(keys)
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    lines = []
    for layout in LAYOUTS:
        why = [f"missing {p}" for p in layout.missing(keys)] + [f"has {p}" for p in layout.conflicts(keys)]
        lines.append(f"  {layout.name} ({layout.family}): {'; '.join(why)}")
    sample = ", ".join(sorted(keys)[:5]) or "none"
    raise ModelLoadError(
        "unrecognised single-file layout; looked for:\n" + "\n".join(lines) + f"\nfirst keys in the file: {sample}"
    )


# -------------------------------------------------------------------------------------------------- converters

def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


Converter = Callable[[StateDict, str, torch.nn.Module], StateDict]  # (file tensors of a part, its prefix, target)


def _convert_ldm_unet(sd: StateDict, prefix: str, module: torch.nn.Module) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(sd, _config_dict(module))


def _convert_ldm_vae(sd: StateDict, prefix: str, module: torch.nn.Module) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(sd, _config_dict(module))


def _convert_clip(sd: StateDict, prefix: str, module: torch.nn.Module) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    out = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix)
    for key in ("text_model.embeddings.position_ids", "embeddings.position_ids"):
        out.pop(key, None)  # a buffer transformers no longer saves (non-persistent)
    if not any(k.startswith("text_model.") for k in module.state_dict()):
        # transformers 5 dropped CLIPTextModel's `text_model` wrapper (its own loader strips the prefix too)
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def _convert_open_clip(sd: StateDict, prefix: str, module: torch.nn.Module) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    # It reads only `config.hidden_size` (when the file lacks text_projection) from the model it is given.
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=_config_dict(module)["hidden_size"]))
    return convert_open_clip_checkpoint(stub, sd, prefix=prefix)


def _convert_bfl_flux(sd: StateDict, prefix: str, module: torch.nn.Module) -> StateDict:
    # Ours, not diffusers' convert_flux_transformer_checkpoint_to_diffusers: that one hard-codes hidden size 3072.
    return flux_bfl_to_diffusers({k[len(prefix):]: v for k, v in sd.items()})


CONVERTERS: dict[str, Converter] = {
    "ldm_unet": _convert_ldm_unet,
    "ldm_vae": _convert_ldm_vae,
    "clip": _convert_clip,
    "open_clip": _convert_open_clip,
    "bfl_flux": _convert_bfl_flux,
}

# ---------------------------------------------------------------------------------------------- reading a file

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """One checkpoint file: its keys and shapes (meta tensors, from the header only) and, on demand, its tensors.

    safetensors tensors are views of a private mapping of the file (safetensors 0.8 "mmap" backend), so they cost page
    cache, not process memory; that backend reads a tensor's pages ahead when it is handed out, so a cold load pays
    the disk read inside `tensors()` rather than at first use.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such checkpoint file")
        suffix = self.path.suffix.lower()
        self._loaded: StateDict | None = None
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{self.path}: {suffix} checkpoints are pickle files, which can run arbitrary code when loaded; "
                    "convert it to .safetensors, or pass allow_pickle=True if you trust the source"
                )
            self._loaded = _load_pickle(self.path)
            self.meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._loaded.items()}
        elif suffix in SAFETENSORS_SUFFIXES:
            self.meta = self._read_header()
        else:
            raise ModelLoadError(
                f"{self.path}: unsupported checkpoint type {suffix!r} "
                f"(expected {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})"
            )

    @property
    def keys(self) -> list[str]:
        return list(self.meta)

    def _read_header(self) -> StateDict:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = {}
                for key in f.keys():
                    view = f.get_slice(key)
                    dtype = _ST_DTYPES.get(view.get_dtype(), torch.float32)
                    meta[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
                return meta
        except Exception as e:  # SafetensorError: truncated, not a safetensors file, bad header
            raise ModelLoadError(f"{self.path}: not a readable safetensors file ({e})") from None

    def tensors(self, keys: Iterable[str]) -> StateDict:
        if self._loaded is not None:
            return {k: self._loaded[k] for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read tensors ({e})") from None


def _load_pickle(path: Path) -> StateDict:
    """`weights_only=True` refuses arbitrary objects; `mmap=True` avoids a second copy (zip-format files only)."""
    try:
        try:
            obj = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), weights_only=True, map_location="cpu")  # legacy (non-zip) format
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load pickle checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: pickle checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------ parts and meta building


def _part_prefix(part: FilePart, keys: Sequence[str]) -> str | None:
    """The prefix under which the part is stored, or None when the file does not hold this part."""
    present = set(keys)
    return next((p for p in part.prefixes if p + part.marker in present), None)


def _part_keys(prefix: str, keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


def _component_class(folder: Path, name: str) -> tuple[str, type[Any]]:
    entry = read_model_index(folder).get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
        raise ModelLoadError(f"{folder}: model_index.json has no component {name!r}")
    return entry[0], resolve_class(entry[0], entry[1])


def build_meta_component(folder: Path, name: str) -> torch.nn.Module:
    """Instantiate a component from its config on the meta device; buffers stay real (CLIP's position_ids are not
    saved in checkpoints, so they must exist after loading)."""
    from accelerate import init_empty_weights

    library, cls = _component_class(folder, name)
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            module = cls.from_config(cls.load_config(str(folder / name)))
        else:
            module = cls(cls.config_class.from_pretrained(str(folder / name)))
    if _tied_keys(module):
        module.tie_weights()  # transformers ties (T5's embed_tokens -> shared) in from_pretrained, not in __init__
    return module


def _tied_keys(module: torch.nn.Module) -> dict[str, str]:
    keys = getattr(module, "_tied_weights_keys", None)
    return dict(keys) if isinstance(keys, dict) else {}


def _complete_tied(module: torch.nn.Module, sd: StateDict) -> StateDict:
    """A file stores a tied tensor once; give the other name the same tensor so a strict load accepts it."""
    for target, source in _tied_keys(module).items():
        if target not in sd and source in sd:
            sd[target] = sd[source]
        elif source not in sd and target in sd:
            sd[source] = sd[target]
    return sd


def _shape_mismatch(module: torch.nn.Module, converted: StateDict) -> str | None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items() if v is not None}
    if missing := sorted(expected.keys() - got.keys()):
        return f"{len(missing)} keys missing from the file, e.g. {missing[:3]}"
    if unexpected := sorted(got.keys() - expected.keys()):
        return f"{len(unexpected)} file keys the config has no place for, e.g. {unexpected[:3]}"
    for key, shape in expected.items():
        if got[key] != shape:
            return f"{key}: file has {list(got[key])}, config expects {list(shape)}"
    return None


@dataclass
class _Match:
    folder: Path
    modules: dict[str, torch.nn.Module]  # meta modules of the parts the file holds


def _try_candidate(folder: Path, family: str, parts: dict[str, tuple[FilePart, str]], ckpt: Checkpoint
                   ) -> _Match | str:
    """The candidate's meta modules if every part the file holds agrees in keys and shapes, else the reason why not."""
    try:
        if folder_family(folder).name != family:
            return f"a {folder_family(folder).name} folder, not {family}"
        modules = {}
        for name, (part, prefix) in parts.items():
            module = build_meta_component(folder, name)
            meta = {k: ckpt.meta[k] for k in _part_keys(prefix, ckpt.keys)}
            converted = _complete_tied(module, CONVERTERS[part.converter](meta, prefix, module))
            if reason := _shape_mismatch(module, converted):
                return f"{name}: {reason}"
            modules[name] = module
        return _Match(folder, modules)
    except ModelLoadError as e:
        return str(e)
    except Exception as e:  # a converter that trips over a foreign structure is a mismatch too
        return f"{type(e).__name__}: {e}"


def _choose(candidates: Iterable[Path], family: str, parts: dict[str, tuple[FilePart, str]], ckpt: Checkpoint
            ) -> _Match:
    reasons = []
    for folder in candidates:
        result = _try_candidate(Path(folder), family, parts, ckpt)
        if isinstance(result, _Match):
            return result
        reasons.append(f"  {folder}: {result}")
        log.debug("single file %s: skipping candidate %s (%s)", ckpt.path, folder, result)
    tried = "\n".join(reasons) or "  (no candidate folders)"
    raise ModelLoadError(
        f"{ckpt.path}: no {family} architecture config matches the checkpoint's tensor shapes; tried:\n{tried}\n"
        "pass a diffusers-layout config folder of the same architecture (model_index.json and component configs)"
    )


# ------------------------------------------------------------------------------------------------- materialise


def assign_weights(module: torch.nn.Module, sd: StateDict, torch_dtype: torch.dtype | None) -> torch.nn.Module:
    """Hand the (mmapped) tensors to the meta module without copying, then cast only if the dtype differs."""
    module.load_state_dict(_complete_tied(module, sd), strict=True, assign=True)
    if _tied_keys(module):
        module.tie_weights()  # assign replaced the shared parameter with two separate ones
    if torch_dtype is not None and any(p.dtype != torch_dtype for p in module.parameters() if p.is_floating_point()):
        module.to(torch_dtype)
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise ModelLoadError(f"{type(module).__name__}: tensors left on the meta device after loading: {on_meta[:5]}")
    module.eval()
    module.requires_grad_(False)
    return module


def _load_part(ckpt: Checkpoint, part: FilePart, prefix: str, module: torch.nn.Module,
               torch_dtype: TorchDtype | None) -> torch.nn.Module:
    if torch_dtype is not None:
        torch_dtype = component_dtype(torch_dtype, part.component, type(module).__name__, module_config(module))
    tensors = ckpt.tensors(_part_keys(prefix, ckpt.keys))
    converted = CONVERTERS[part.converter](tensors, prefix, module)
    del tensors
    try:
        return assign_weights(module, converted, torch_dtype)
    except RuntimeError as e:  # load_state_dict: shapes were checked, so this is a corrupted file
        raise ModelLoadError(f"{ckpt.path}: cannot load {part.component} ({e})") from None


# ------------------------------------------------------------------------------------------ other components


def _in_folder(folder: Path, name: str, allow_pickle: bool) -> bool:
    """Whether the folder holds the component itself (not just a config: arch folders ship no weights)."""
    entry = read_model_index(folder).get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
        return False
    sub = folder / name
    kind = component_kind(entry[0], entry[1])
    if kind == "scheduler":
        return (sub / "scheduler_config.json").is_file()
    if kind == "tokenizer":
        return sub.is_dir() and any(sub.iterdir())
    suffixes = (".safetensors",) + (PICKLE_SUFFIXES if allow_pickle else ())
    return sub.is_dir() and any(p.name.endswith(suffixes) for p in sub.iterdir())


def hub_sources(folder: Path) -> list[str]:
    """Hub ids of the registry models whose `arch` is this configs/arch folder (where its tokenizers live)."""
    folder = Path(folder).resolve()
    if folder.parent != (configs_dir() / "arch").resolve():
        return []
    return [s.source for s in registry().values() if s.arch == folder.name and not s.is_tiny]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_folder(repo_id: str, names: Sequence[str]) -> Path:
    """A snapshot holding the named component folders: the local cache first, then (unless offline) a download of
    only those folders (safetensors, no pickles or fp16 duplicates)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *[f"{n}/*" for n in names]]
    errors = []
    for local_only in (True, False) if not _offline() else (True,):
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_IGNORE_PATTERNS,
                                          local_files_only=local_only))
        except Exception as e:
            errors.append(type(e).__name__)
            continue
        if (path / "model_index.json").is_file() and all((path / n).is_dir() for n in names):
            return path
        errors.append("incomplete snapshot")
    raise HubUnavailableError(
        repo_id, f"components {list(names)} are not in the local hub cache and could not be fetched "
        f"({', '.join(errors)}); pass a candidate folder that contains them"
    )


def load_missing_components(folder: Path, names: Sequence[str], *, torch_dtype: TorchDtype = torch.float32,
                            allow_pickle: bool = False) -> dict[str, Any]:
    """Components a single file does not hold: from `folder` when it has them, else from its registry hub source."""
    folder = Path(folder)
    local = [n for n in names if _in_folder(folder, n, allow_pickle)]
    parts = load_folder(folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle, only=set(local)) if local else {}
    remote = [n for n in names if n not in local]
    if not remote:
        return parts
    sources = hub_sources(folder)
    if not sources:
        raise ModelLoadError(
            f"{folder}: lacks {remote} (configs only) and no registry model names a hub source for it; "
            "pass a candidate folder that contains them"
        )
    failures: list[HubUnavailableError] = []
    for source in sources:
        try:
            snapshot = _hub_folder(source, remote)
        except HubUnavailableError as e:
            failures.append(e)
            continue
        parts.update(load_folder(snapshot, torch_dtype=torch_dtype, allow_pickle=allow_pickle, only=set(remote)))
        return parts
    raise HubUnavailableError(
        sources[0], f"a single file of {folder.name} needs {remote}, which {folder} does not ship; "
        + "; ".join(str(e) for e in failures)
    )


# --------------------------------------------------------------------------------------------------- public API


def arch_candidates(family: str) -> Iterator[Path]:
    """Config folders to try for a single file of `family`, in order: configs/arch folders of its registry models,
    then the offline random-weight models. Lazy: a random-weight model is built only when the shipped configs did
    not match, so loading a real checkpoint never builds the 400 MB benchmark models (small-sdxl, small-flux)."""
    get_family(family)
    specs = [spec for spec in registry().values() if spec.family == family]
    seen: set[Path] = set()
    for spec in specs:
        folder = configs_dir() / "arch" / spec.arch if spec.arch else None
        if folder is not None and folder not in seen and folder.is_dir():
            seen.add(folder)
            yield folder
    for name in dict.fromkeys(spec.tiny_config for spec in specs if spec.is_tiny and spec.tiny_config):
        yield ensure_tiny_model(name)


def _file_parts(layout: LayoutSpec, ckpt: Checkpoint) -> dict[str, tuple[FilePart, str]]:
    parts = {}
    for part in layout.parts:
        prefix = _part_prefix(part, ckpt.keys)
        if prefix is not None:
            parts[part.component] = (part, prefix)
    return parts


def load_single_file(path: str | Path, *, candidates: Sequence[Path] | None = None, allow_pickle: bool = False,
                     torch_dtype: TorchDtype = torch.float32) -> tuple[str, dict[str, Any]]:
    """Load an original-layout checkpoint as diffusers components: (family name, {component name: object}).

    `candidates` are diffusers-layout folders (configs; weights optional); the first whose architecture matches the
    file's tensor shapes is used. None: `arch_candidates(family)` of the detected family.
    """
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    layout = detect_layout(ckpt.keys)
    family = get_family(layout.family)
    parts = _file_parts(layout, ckpt)
    if not parts:
        raise ModelLoadError(f"{ckpt.path}: matches layout {layout.name} but holds none of its components")
    chosen = _choose(arch_candidates(family.name) if candidates is None else candidates, family.name, parts, ckpt)
    log.info("single file %s: layout %s, config %s", ckpt.path, layout.name, chosen.folder)
    rest = [n for n in family.components if n not in parts]  # first: a missing tokenizer should fail fast
    components = load_missing_components(chosen.folder, rest, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    for name, (part, prefix) in parts.items():
        components[name] = _load_part(ckpt, part, prefix, chosen.modules[name], torch_dtype)
    return family.name, {n: components[n] for n in family.components}


def load_single_file_component(path: str | Path, component: str, config_folder: Path, *,
                               torch_dtype: TorchDtype = torch.float32, allow_pickle: bool = False
                               ) -> torch.nn.Module:
    """Load one component (e.g. the UNet) of a single file against one config folder; nothing else is read."""
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    layout = detect_layout(ckpt.keys)
    parts = {k: v for k, v in _file_parts(layout, ckpt).items() if k == component}
    if not parts:
        raise ModelLoadError(f"{ckpt.path}: holds no {component!r} (layout {layout.name})")
    chosen = _choose([Path(config_folder)], layout.family, parts, ckpt)
    part, prefix = parts[component]
    return _load_part(ckpt, part, prefix, chosen.modules[component], torch_dtype)
