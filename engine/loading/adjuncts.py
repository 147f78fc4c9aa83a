"""Where an adjunct (ControlNet, IP-Adapter) named by a caller comes from, under the caller's policy.

An adjunct is named like a model: a registry id of its kind, a local path (trusted callers only), or a hub
repository id. Untrusted callers get the same rules as for models (engine/loading/__init__.py): registry ids, the
operator's pinned and allowed names, and hub ids that are already cached (or, when the operator allows downloads,
under the size cap); never a local path, whatever the name looks like. Refusals name the request field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HubUnavailableError, RefusedSourceError
from ..registry import ModelSpec, adjuncts, find_adjunct
from . import CallerPolicy, caller_policy, is_hub_id

KIND_NAMES = {"controlnet": "ControlNet", "ip_adapter": "IP-Adapter"}


@dataclass(frozen=True)
class AdjunctSource:
    """A resolved adjunct name: the registry entry (None for a path or hub id) and how it is reached."""

    name: str
    spec: ModelSpec | None
    how: str  # "registry", "tiny", "local", "hub"
    hub_id: str | None = None  # the repository to snapshot (registry hub entries and hub ids)
    folder: Path | None = None  # already local: a tiny build or a trusted caller's path


def resolve_adjunct(name: str, kind: str, field: str, policy: CallerPolicy | None = None) -> AdjunctSource:
    """How `name` is reached for the current caller, or a 422 naming `field`. Touches the disk only for trusted
    callers' paths, so what an untrusted caller is told depends on the name alone."""
    policy = policy or caller_policy()
    spec = find_adjunct_spec(kind, name)
    if not policy.trusted and name not in policy.pinned and name not in policy.allow_models:
        if policy.allow_models:
            raise RefusedSourceError(field, "this server serves only the models it allows",
                                     ", ".join(sorted(policy.allow_models)))
        if spec is None and not is_hub_id(name):
            raise RefusedSourceError(field, f"must be a registered {KIND_NAMES[kind]} id or a hub repository id "
                                     "(owner/name)", ", ".join(sorted(adjuncts(kind))))
    if spec is not None:
        if spec.is_tiny:
            from .tiny import ensure_tiny_model

            return AdjunctSource(name, spec, "tiny", folder=ensure_tiny_model(spec.tiny_config or ""))
        return AdjunctSource(name, spec, "registry", hub_id=spec.source)
    trusted_path = policy.trusted or (name in policy.pinned and not is_hub_id(name))
    if trusted_path:
        path = Path(name).expanduser()
        if path.exists():
            return AdjunctSource(name, None, "local", folder=path.resolve())
    if is_hub_id(name):
        return AdjunctSource(name, None, "hub", hub_id=name)
    raise RefusedSourceError(field, f"not a registered {KIND_NAMES[kind]} id, an existing path, or a hub id "
                             "(owner/name)", ", ".join(sorted(adjuncts(kind))))


def find_adjunct_spec(kind: str, name: str) -> ModelSpec | None:
    """The registry entry `name` means: its id, or the hub repository a single entry of `kind` points at. Reads no
    disk and no network, so a request can be checked against it before it is queued."""
    return find_adjunct(kind, name) or _by_source(kind, name)


def _by_source(kind: str, name: str) -> ModelSpec | None:
    """A hub id that a registry entry of `kind` points at (fal's `path` fields name hub repositories) is that entry,
    so it gets the entry's family check and layout. Only when the entry needs nothing else (IP-Adapters also need a
    subfolder and weight name: one repository holds several)."""
    if not is_hub_id(name):
        return None
    matches = [s for s in adjuncts(kind).values() if s.source == name]
    return matches[0] if len(matches) == 1 else None


def hub_snapshot(repo_id: str, patterns: list[str], field: str, policy: CallerPolicy | None = None) -> Path:
    """The files of `repo_id` matching `patterns`: from the local HF cache, else downloaded when the caller may
    (trusted callers always; untrusted ones when the operator allows hub downloads, under the size cap)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    policy = policy or caller_policy()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or incomplete): download below if allowed
        pass
    if not policy.trusted and not policy.allow_hub_downloads and repo_id not in policy.allow_models:
        raise RefusedSourceError(field, f"hub repository {repo_id!r} is not in this server's model cache, and hub "
                                 "downloads are off for remote callers (engine serve --allow-hub-downloads)")
    try:
        if not policy.trusted:
            info = HfApi().model_info(repo_id, files_metadata=True, timeout=30)
            files = filter_repo_objects(info.siblings or [], allow_patterns=patterns, key=lambda f: f.rfilename)
            size = sum(f.size or 0 for f in files)
            if size > policy.max_hub_bytes:
                raise RefusedSourceError(field, f"hub repository {repo_id!r} is {size} bytes, over this server's "
                                         "download limit", f"at most {policy.max_hub_bytes} bytes")
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RefusedSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, missing, gated
        raise HubUnavailableError(repo_id, f"could not fetch it from the Hugging Face hub ({type(e).__name__}) "
                                  "and it is not in the local cache") from None
