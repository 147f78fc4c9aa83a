"""Output store: encode images once, hand back fal `Image` objects whose `url` is a data URI (`sync_mode`), a server
URL (`{base_url}files/{key}`) or, for the in-process API, a `file://` URI.

Files live in one directory with random names and are deleted after a TTL, so a long-running server does not fill
its disk; keys are validated on read so `/files/...` can serve nothing but what the store wrote.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ImageFormat = Literal["jpeg", "png"]
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}
_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(jpeg|png)$")


def encode_image(image: Image.Image, fmt: ImageFormat, quality: int = 95) -> bytes:
    """JPEG (RGB, quality 95, as fal's defaults produce) or PNG (lossless, keeps alpha)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class StoredFile:
    key: str
    path: Path
    content_type: str
    size: int


class FileStore:
    """Thread-safe store of output files with a time-to-live (seconds)."""

    def __init__(self, root: str | Path | None = None, *, ttl_s: float = 3600.0):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="engine-files-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._last_purge = time.monotonic()

    def put(self, data: bytes, fmt: ImageFormat) -> StoredFile:
        key = f"{secrets.token_urlsafe(18)}.{fmt}"
        path = self.root / key
        path.write_bytes(data)
        with self._lock:
            self._expiry[key] = time.monotonic() + self.ttl_s
        self._maybe_purge()
        return StoredFile(key, path, CONTENT_TYPES[fmt], len(data))

    def get(self, key: str) -> StoredFile | None:
        """The file for `key`, or None when unknown, malformed or expired."""
        if not _KEY.match(key):
            return None
        with self._lock:
            expiry = self._expiry.get(key)
        if expiry is None or expiry < time.monotonic():
            return None
        path = self.root / key
        if not path.is_file():
            return None
        fmt = key.rsplit(".", 1)[1]
        return StoredFile(key, path, CONTENT_TYPES[fmt], path.stat().st_size)

    def purge(self) -> int:
        """Delete expired files; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [k for k, t in self._expiry.items() if t < now]
            for k in expired:
                del self._expiry[k]
            self._last_purge = now
        for k in expired:
            (self.root / k).unlink(missing_ok=True)
        return len(expired)

    def _maybe_purge(self) -> None:
        if time.monotonic() - self._last_purge > min(60.0, self.ttl_s):
            self.purge()

    def image_object(self, image: Image.Image, fmt: ImageFormat, *, sync_mode: bool,
                     base_url: str | None) -> dict[str, Any]:
        """A fal `Image`: {url, content_type, file_name, file_size, width, height}."""
        data = encode_image(image, fmt)
        content_type = CONTENT_TYPES[fmt]
        if sync_mode:
            url, name = data_uri(data, content_type), f"{secrets.token_urlsafe(9)}.{fmt}"
        else:
            stored = self.put(data, fmt)
            name = stored.key
            url = f"{base_url.rstrip('/')}/files/{stored.key}" if base_url else stored.path.resolve().as_uri()
        return {"url": url, "content_type": content_type, "file_name": name, "file_size": len(data),
                "width": image.width, "height": image.height}
