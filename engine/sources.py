"""What a caller may name as a source, as text: hub repository ids (owner/name), hub files (owner/name/path) and
checkpoint suffixes. Pure (no I/O, no engine imports), so the registry, the loaders, LoRA resolution and the fal
endpoints all check names the same way."""

from __future__ import annotations

import re

# A Hugging Face repository id, owner/name: what an untrusted caller may name besides a registry id. Neither part
# may start or end with "." or "-", or hold "..", so no spelling of it is a path that climbs out of anywhere.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
HUB_FILE = re.compile(rf"^(?P<repo>{_HUB_PART}/{_HUB_PART})(?:/(?P<file>.+))?$")  # owner/name[/path/in/repo]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Checkpoint formats read with pickle (torch.load), which can run code: loaded only with allow_pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
GGUF_SUFFIXES = (".gguf",)
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + GGUF_SUFFIXES  # what a single-file model may be


def is_hub_id(name: str) -> bool:
    """`name` is an owner/name repository id (and nothing a path could be read into)."""
    return bool(HUB_ID.match(name)) and ".." not in name and "--" not in name


def parse_hub_ref(ref: str, *, file_suffix: str | None = None) -> tuple[str, str | None] | None:
    """(repo, file or None) for "owner/name" or "owner/name/path/to/file"; None when `ref` is not one (a bad repo
    id, "..", or a file not ending in `file_suffix`)."""
    match = HUB_FILE.match(ref)
    if match is None or ".." in ref or not is_hub_id(match["repo"]):
        return None
    file = match["file"]
    if file is not None and file_suffix is not None and not file.endswith(file_suffix):
        return None
    return match["repo"], file
