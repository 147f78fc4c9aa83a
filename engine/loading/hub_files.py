"""Single files referenced as "owner/repo/path/to/file.safetensors" (preset UNets, LoRAs) or as local paths."""

from __future__ import annotations

from pathlib import Path

from ..errors import HubUnavailableError, ModelNotFoundError
from ..sources import parse_hub_ref


def split_hub_file(ref: str) -> tuple[str, str]:
    parsed = parse_hub_ref(ref, file_suffix=".safetensors")
    if parsed is None or parsed[1] is None:
        raise ModelNotFoundError(ref, "expected a local .safetensors file or owner/repo/file.safetensors")
    return parsed[0], parsed[1]


def cached_hub_file(ref: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        repo, name = split_hub_file(ref)
    except ModelNotFoundError:
        return None
    found = try_to_load_from_cache(repo, name)
    return Path(found) if isinstance(found, str) else None


def fetch_file(ref: str) -> Path:
    """A local path as is; a hub file from the cache, else downloaded; a clear error when neither works."""
    local = Path(ref).expanduser()
    if local.is_file():
        return local
    cached = cached_hub_file(ref)
    if cached is not None:
        return cached
    repo, name = split_hub_file(ref)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name))
    except Exception as e:
        raise HubUnavailableError(ref, f"could not fetch {name} from {repo} ({type(e).__name__}) and it is not "
                                  "cached; pass a local file instead") from None
