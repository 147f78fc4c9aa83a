"""Load an AuraSR generator: a registry id, a hub id, a folder (config.json + model.safetensors), or one
.safetensors file with config.json beside it.

The network is built on the meta device and the mmapped safetensors are assigned into it (`assign=True`), so a cold
start costs the disk read and no second copy. Pickle checkpoints are refused unless the caller opts in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import HubUnavailableError, ModelLoadError, ModelNotFoundError, UnsafeCheckpointError
from ..models.aurasr import AuraSRConfig, AuraSRGenerator
from ..paths import cache_dir, configs_dir
from ..registry import find_spec, registry
from ..sources import PICKLE_SUFFIXES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME]
TINY_BUILDER_VERSION = "1"


def load_aurasr(
    path_or_id: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> AuraSRGenerator:
    """Resolve `path_or_id` to a config and a weights file, then load strictly (every key, every shape)."""
    config_path, weights_path = resolve_checkpoint(path_or_id, allow_pickle=allow_pickle)
    config = read_config(config_path)
    state = read_state_dict(weights_path, allow_pickle=allow_pickle)
    return build_from_state_dict(config, state, torch_dtype=torch_dtype, source=str(weights_path))


# ---------------------------------------------------------------------------------------------------- resolve


def resolve_checkpoint(path_or_id: str | os.PathLike[str], *, allow_pickle: bool = False) -> tuple[Path, Path]:
    """(config.json, weights file) for a registry id, a local folder or file, or a hub repository id."""
    text = os.fspath(path_or_id)
    spec = find_spec(text)
    if spec is not None:
        if spec.family != "aurasr":
            raise ModelLoadError(f"model {text!r} is a {spec.family} model, not an AuraSR upscaler")
        if spec.is_tiny and spec.tiny_config:
            return _from_folder(ensure_tiny_aurasr(spec.tiny_config), allow_pickle)
        return _from_folder(fetch_aurasr(spec.source, model_id=text), allow_pickle)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path, allow_pickle)
    if path.is_file():
        return _from_file(path, allow_pickle)
    if _looks_like_hub_id(text):
        return _from_folder(fetch_aurasr(text), allow_pickle)
    known = [m for m, s in registry().items() if s.family == "aurasr"]
    raise ModelNotFoundError(text, "not a registered id, an existing path, or a hub repository id", known=known)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _from_folder(folder: Path, allow_pickle: bool) -> tuple[Path, Path]:
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise ModelLoadError(f"{folder}: no {CONFIG_NAME}")
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return config, weights
    safe = sorted(folder.glob("*.safetensors"))
    if len(safe) == 1:
        return config, safe[0]
    if len(safe) > 1:
        raise ModelLoadError(f"{folder}: several .safetensors files and no {WEIGHTS_NAME}; pass the file itself")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _check_pickle_allowed(pickles[0], allow_pickle)
        return config, pickles[0]
    raise ModelLoadError(f"{folder}: no weights file ({WEIGHTS_NAME})")


def _from_file(file: Path, allow_pickle: bool) -> tuple[Path, Path]:
    if file.suffix in PICKLE_SUFFIXES:
        _check_pickle_allowed(file, allow_pickle)
    elif file.suffix != ".safetensors":
        raise ModelLoadError(f"{file}: expected a .safetensors file (or a folder)")
    config = file.with_name(CONFIG_NAME)
    if not config.is_file():
        raise ModelLoadError(f"{file}: a single weights file needs {CONFIG_NAME} beside it ({config} is missing)")
    return config, file


def _check_pickle_allowed(file: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{file}: pickle checkpoints can run arbitrary code when loaded; convert it to safetensors, "
            "or pass allow_pickle=True if you trust the source"
        )


# ------------------------------------------------------------------------------------------------------- hub


def cached_aurasr_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of an AuraSR hub repository, if config and weights are both cached (no network)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        return None
    return path if all((path / name).is_file() for name in HUB_FILES) else None


def fetch_aurasr(repo_id: str, *, model_id: str | None = None) -> Path:
    """The local cache first, then a download of just config.json and model.safetensors. Errors name `model_id`
    (the id the caller asked for) and the repository."""
    local = cached_aurasr_snapshot(repo_id)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise HubUnavailableError(
            model_id or repo_id,
            f"could not fetch hub repository {repo_id} ({type(e).__name__}) and it is not in the local cache; "
            f"download {CONFIG_NAME} and {WEIGHTS_NAME} and pass their folder (or the .safetensors file) instead",
        ) from None
    missing = [name for name in HUB_FILES if not (path / name).is_file()]
    if missing:
        raise HubUnavailableError(model_id or repo_id, f"hub repository {repo_id} lacks {missing}; it is not an AuraSR checkpoint")
    return path


# ------------------------------------------------------------------------------------------------------ read


def read_config(path: Path) -> AuraSRConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return AuraSRConfig.from_dict(raw)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a valid AuraSR config ({e})") from None


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """safetensors via mmap; pickles (only when allowed) with `weights_only=True`. Any decode failure is a
    ModelLoadError naming the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        _check_pickle_allowed(path, allow_pickle)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: not a state dict of tensors")
    return state


def build_from_state_dict(
    config: AuraSRConfig, state: dict[str, torch.Tensor], *, torch_dtype: torch.dtype, source: str = "state dict"
) -> AuraSRGenerator:
    """Build on meta, assign the tensors (cast to `torch_dtype` where they differ), refuse any mismatch."""
    with torch.device("meta"):
        model = AuraSRGenerator(config)
    state = {k: v.to(torch_dtype) if v.is_floating_point() and v.dtype != torch_dtype else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{source}: weights do not match the AuraSR config ({_first_lines(str(e))})") from None
    return model.eval().requires_grad_(False)


def _first_lines(text: str, n: int = 4) -> str:
    lines = text.strip().splitlines()
    return " ".join(lines[:n]) + (" ..." if len(lines) > n else "")


# ------------------------------------------------------------------------------------------------------ tiny


def _read_tiny(name: str) -> tuple[dict[str, Any], str]:
    path = configs_dir() / "tiny" / f"{name}.yaml"
    if not path.is_file():
        raise ModelLoadError(f"no tiny config {path}")
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text), text


def tiny_aurasr_dir(name: str = "aura-sr") -> Path:
    """Where the tiny model's folder lives; the name carries a hash of its config, so an edit rebuilds it."""
    _, text = _read_tiny(name)
    digest = hashlib.sha256((TINY_BUILDER_VERSION + text).encode()).hexdigest()[:12]
    return cache_dir() / "tiny" / f"{name}-{digest}"


def build_tiny_aurasr(name: str = "aura-sr") -> tuple[AuraSRConfig, AuraSRGenerator]:
    """The tiny generator with weights drawn from the config's seed (a private generator: global RNG untouched)."""
    raw, _ = _read_tiny(name)
    if raw.get("family") != "aurasr":
        raise ModelLoadError(f"tiny config {name!r} is not an aurasr config")
    config = AuraSRConfig.from_dict(raw["components"]["upsampler"]["config"])
    with torch.device("meta"):
        model = AuraSRGenerator(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(int(raw.get("seed", 0)))
    model.reset_parameters(generator)
    calibrate_output(model, generator)
    return config, model


@torch.no_grad()
def calibrate_output(model: AuraSRGenerator, generator: torch.Generator, mean: float = 0.5, std: float = 0.15) -> None:
    """Rescale the last 1x1 conv so random weights give an image (per channel `mean` +- `std` on a seeded tile)
    rather than a flat colour clamped to 0 or 1: tests then compare real values, and the demo shows texture."""
    side = model.tile_size
    tile = torch.rand(1, model.config.channels, side, side, generator=generator)
    noise = torch.randn(1, model.noise_dim, generator=generator)
    out = model(tile, noise, input_noise=torch.zeros_like(tile))
    mu, sigma = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3)).clamp_min(1e-12)
    gain = std / sigma
    model.final_to_rgb.weight.mul_(gain[:, None, None, None])
    model.final_to_rgb.bias.copy_(mean + (model.final_to_rgb.bias - mu) * gain)


def ensure_tiny_aurasr(name: str = "aura-sr") -> Path:
    """The tiny model's folder (config.json + model.safetensors), written once with an atomic rename."""
    target = tiny_aurasr_dir(name)
    if (target / WEIGHTS_NAME).is_file() and (target / CONFIG_NAME).is_file():
        return target
    from safetensors.torch import save_file

    config, model = build_tiny_aurasr(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / WEIGHTS_NAME).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
