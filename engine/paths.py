"""Where the engine finds its shipped configs and keeps its cache, and how it names a file by its content."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def configs_dir() -> Path:
    """The `engine/configs/` folder shipped inside the package as package data: model presets, optimization levels,
    tiny model configs, architecture configs (override: ENGINE_CONFIGS_DIR)."""
    env = os.environ.get("ENGINE_CONFIGS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "configs"


def cache_dir() -> Path:
    """Root of everything the engine writes (tiny models, compiled artifacts): ENGINE_CACHE_DIR or ~/.cache/engine."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "engine"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks (cache keys of downloads, artifact manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()
