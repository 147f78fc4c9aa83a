"""The on-disk store of exported artifacts (ONNX graphs, TensorRT engines): cache_dir()/exported/<key>/.

An artifact is built into a private temporary folder, its manifest (size and sha256 of every file) is written last,
and the folder is renamed into place, so a reader never sees a half-written artifact. A folder whose manifest is
missing or disagrees with its files (truncated, corrupted, hand-edited) is rebuilt, never trusted. Builds take an
exclusive file lock per key, so a second process asking for the same artifact waits for the first build and then
reuses it instead of building it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from ...paths import cache_dir, file_sha256

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the layout of an artifact folder changes

_stats_lock = threading.Lock()
_STATS = {"hits": 0, "builds": 0, "rebuilds": 0}
_verified: set[tuple[str, str]] = set()  # (folder, digest of manifest + file sizes/mtimes) hashed in this process


def stats() -> dict[str, int]:
    """Counters of this process: `hits` (reused from disk), `builds` (built), `rebuilds` (built over a bad one)."""
    with _stats_lock:
        return dict(_STATS)


def reset_stats() -> None:
    with _stats_lock:
        for k in _STATS:
            _STATS[k] = 0


def _count(name: str) -> None:
    with _stats_lock:
        _STATS[name] += 1


def store_root() -> Path:
    return cache_dir() / "exported"


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder and the metadata its builder recorded."""

    path: Path
    meta: dict[str, Any]
    reused: bool  # True when it came from disk, False when this call built it

    def file(self, name: str) -> Path:
        return self.path / name


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    if not files:
        raise RuntimeError(f"artifact builder wrote nothing into {folder}")
    body = json.dumps({"format": FORMAT, "files": files, "meta": meta}, indent=1, sort_keys=True, default=str)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _memo(folder: Path, raw: str, manifest: dict[str, Any]) -> tuple[str, str] | None:
    """Key of one verified state of a folder (manifest text, each file's size and mtime); None if a file is missing
    or has the wrong size."""
    stamps = []
    for name, entry in manifest["files"].items():
        try:
            st = (folder / name).stat()
        except OSError:
            return None
        if st.st_size != entry["size"]:
            return None
        stamps.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return str(folder), hashlib.sha256((raw + "|".join(stamps)).encode()).hexdigest()


def _read_manifest(folder: Path) -> tuple[str, dict[str, Any]] | None:
    try:
        raw = (folder / MANIFEST).read_text(encoding="utf-8")
        manifest = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("files"):
        return None
    return raw, manifest


def verify(folder: Path) -> dict[str, Any] | None:
    """The manifest's metadata if every listed file is there with its size and sha256; None otherwise. Sizes are
    checked on every call, contents once per process for as long as no file is rewritten."""
    read = _read_manifest(folder)
    if read is None:
        return None
    raw, manifest = read
    memo = _memo(folder, raw, manifest)
    if memo is None:
        return None
    if memo not in _verified:
        if any(file_sha256(folder / name) != entry["sha256"] for name, entry in manifest["files"].items()):
            return None
        _verified.add(memo)
    return dict(manifest.get("meta") or {})


def _trust_built(folder: Path) -> None:
    """The manifest was just computed from these files: no need to hash them again in this process."""
    read = _read_manifest(folder)
    memo = _memo(folder, *read) if read is not None else None
    if memo is not None:
        _verified.add(memo)


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """Exclusive lock on <root>/<key>.lock, held while one process checks and builds the artifact; a second caller
    (another process, or another thread: each call takes its own lock object) waits for it, without a time limit. The
    lock is the OS's (flock on POSIX, LockFileEx on Windows, through `filelock`): freed if its holder dies."""
    root = store_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f"{key}.lock", timeout=-1):
        yield


def get_or_build(key: str, build: Callable[[Path], dict[str, Any] | None]) -> Artifact:
    """Return the verified artifact `key`, building it with `build(folder)` if absent or bad.

    `build` writes its files into the (empty, private) folder it is given and may return metadata to keep in
    the manifest. Exceptions from `build` propagate and leave nothing behind.
    """
    folder = store_root() / key
    meta = verify(folder)
    if meta is not None:
        _count("hits")
        return Artifact(folder, meta, reused=True)
    with _locked(key):
        meta = verify(folder)  # another process may have finished it while we waited for the lock
        if meta is not None:
            _count("hits")
            return Artifact(folder, meta, reused=True)
        stale = folder.exists()
        for orphan in store_root().glob(f".{key}-*"):  # left by a builder that died; none can be running now
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=store_root()))
        try:
            meta = dict(build(tmp) or {})
            _write_manifest(tmp, meta)
            if stale:
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            _trust_built(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _count("rebuilds" if stale else "builds")
        return Artifact(folder, meta, reused=False)


def weights_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """Identity of a module's weights without hashing gigabytes: every tensor's name, shape and dtype plus a strided
    sample of its values. Fused LoRAs, swapped UNets and re-seeded tiny models all change the sample; the model's
    folder path alone (its `_name_or_path`) would not see them."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            sample = flat[::step][:samples].to("cpu", torch.float64)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
