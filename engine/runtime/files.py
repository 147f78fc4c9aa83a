"""Output store: encode images once, hand back fal `Image` objects whose `url` is a data URI (`sync_mode`), a server
URL (`{base_url}files/{key}`) or, for the in-process API, a `file://` URI.

Files live in one directory with random names and are deleted after a TTL (counted from the file's modification
time, so a restarted server with the same directory keeps serving them until then), by a periodic purge, so a
long-running server does not fill its disk; a file written by a queued job is also removed with that job's result
(count and byte retention). Keys are validated on read so `/files/...` can serve nothing but what the store wrote.
`close()` stops the purge thread and removes the directory when the store made it (a temporary one).
"""

from __future__ import annotations

import base64
import io
import re
import logging
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .queue import note_file

log = logging.getLogger(__name__)

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
    """Thread-safe store of output files with a time-to-live (seconds). `root` None: a temporary directory, removed
    on `close()`."""

    def __init__(self, root: str | Path | None = None, *, ttl_s: float = 3600.0,
                 purge_interval_s: float | None = None):
        self.temporary = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="engine-files-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.purge_interval_s = purge_interval_s or max(1.0, min(60.0, ttl_s / 2))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self.closed = False

    def put(self, data: bytes, fmt: ImageFormat) -> StoredFile:
        if self.closed:
            raise RuntimeError("the file store is closed")
        key = f"{secrets.token_urlsafe(18)}.{fmt}"
        path = self.root / key
        path.write_bytes(data)
        note_file(key, str(path), len(data))
        self._start_janitor()
        return StoredFile(key, path, CONTENT_TYPES[fmt], len(data))

    def get(self, key: str) -> StoredFile | None:
        """The file for `key`, or None when unknown, malformed or expired."""
        if not _KEY.match(key):
            return None
        path = self.root / key
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file() or st.st_mtime + self.ttl_s < time.time():
            return None
        fmt = key.rsplit(".", 1)[1]
        return StoredFile(key, path, CONTENT_TYPES[fmt], st.st_size)

    def delete(self, key: str) -> bool:
        if not _KEY.match(key):
            return False
        try:
            (self.root / key).unlink()
            return True
        except FileNotFoundError:
            return False

    def purge(self) -> int:
        """Delete expired files; returns how many."""
        cutoff = time.time() - self.ttl_s
        count = 0
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return 0
        for path in entries:
            if not _KEY.match(path.name):
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    count += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not remove %s: %s", path, e)
        return count

    def close(self) -> None:
        """Stop the purge thread; remove the directory if it is temporary, else only expired files. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            janitor = self._janitor
        self._stop.set()
        if janitor is not None and janitor is not threading.current_thread():
            janitor.join(10)
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.purge()

    def __enter__(self) -> "FileStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start_janitor(self) -> None:
        with self._lock:
            if self._janitor is not None or self.closed:
                return
            self._janitor = threading.Thread(target=self._janitor_loop, name="engine-files-janitor", daemon=True)
            self._janitor.start()

    def _janitor_loop(self) -> None:
        while not self._stop.wait(self.purge_interval_s):
            try:
                self.purge()
            except Exception:  # noqa: BLE001 - a failed sweep is retried next time
                log.exception("file store purge failed")

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
