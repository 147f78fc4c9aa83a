"""Output store: encode images once, hand back fal `Image` objects whose `url` is a data URI (`sync_mode`), a server
URL (`{base_url}files/{key}`) or, for the in-process API, a `file://` URI.

Files live in one directory with random names and are deleted after a TTL (counted from the file's modification
time, so a restarted server with the same directory keeps serving them until then), by a periodic purge, so a
long-running server does not fill its disk; a file written by a queued job is also removed with that job's result
(count and byte retention). Keys are validated on read so `/files/...` can serve nothing but what the store wrote.
`close()` stops the purge thread and removes the directory when the store made it (a temporary one).

Uploads (the storage routes fal's clients call before a request) live in `uploads/` under the same root, named by an
id chosen before the bytes arrive (the client is told the file URL first). An `UploadWriter` takes the bytes as they
stream: the declared and the running size are checked against a cap (nothing past it is written), the format is
sniffed from the first bytes (images only: the engine reads nothing else, and the client's content type is never
trusted), and the file appears under its id only once it is whole. Each upload may ask for a shorter life than the
store's TTL (fal's lifecycle header), never a longer one. `read_local` turns this store's own file URLs back into
bytes, so a `file_url` given as an input needs no outbound fetch.
"""

from __future__ import annotations

import base64
import io
import os
import re
import logging
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from PIL import Image

from ..errors import PayloadTooLargeError, UnsupportedMediaTypeError
from .queue import note_file

log = logging.getLogger(__name__)

ImageFormat = Literal["jpeg", "png"]
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                                 "bmp": "image/bmp", "tiff": "image/tiff"}
_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(jpeg|png)$")
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{24,64}$")  # an upload's public name (no extension: sniffed later)
_UPLOAD_FILE = re.compile(r"^([A-Za-z0-9_-]{24,64})\.(jpeg|png|webp|gif|bmp|tiff)$")
SNIFF_BYTES = 16
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_UPLOADS_BYTES = 1 << 30


def sniff_extension(head: bytes) -> str | None:
    """The store's extension for an image named by its magic bytes (PNG, JPEG, WEBP, GIF, BMP, TIFF), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


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
    """Thread-safe store of output files and uploads with a time-to-live (seconds). `root` None: a temporary
    directory, removed on `close()`. `max_upload_bytes` caps one upload, `max_uploads_bytes` all live uploads."""

    def __init__(self, root: str | Path | None = None, *, ttl_s: float = 3600.0,
                 purge_interval_s: float | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_uploads_bytes: int = DEFAULT_MAX_UPLOADS_BYTES):
        self.temporary = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="engine-files-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = self.root / "uploads"
        self.ttl_s = ttl_s
        self.max_upload_bytes = max_upload_bytes
        self.max_uploads_bytes = max_uploads_bytes
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
        """The file for `key` (an output's key or an upload's id), or None when unknown, malformed or expired."""
        if UPLOAD_ID.match(key):
            return self._get_upload(key)
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

    # -- uploads ------------------------------------------------------------------------------------------------
    def new_upload_id(self) -> str:
        return secrets.token_urlsafe(24)

    def _get_upload(self, upload_id: str) -> StoredFile | None:
        for ext, content_type in CONTENT_TYPES.items():
            path = self.uploads_dir / f"{upload_id}.{ext}"
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_mtime + self.ttl_s < time.time():
                return None
            return StoredFile(upload_id, path, content_type, st.st_size)
        return None

    def uploads_size(self) -> int:
        """Bytes of all live uploads (finished ones and those being written)."""
        total = 0
        try:
            entries = list(self.uploads_dir.iterdir())
        except FileNotFoundError:
            return 0
        for path in entries:
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass
        return total

    def begin_multipart(self, upload_id: str, *, ttl_s: float | None = None) -> "MultipartWriter":
        """Parts of upload `upload_id`, in any order and concurrently; `complete()` joins them into one upload."""
        if not UPLOAD_ID.match(upload_id):
            raise ValueError(f"malformed upload id {upload_id!r}")
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._start_janitor()
        return MultipartWriter(self, upload_id, ttl_s)

    def begin_upload(self, upload_id: str, *, ttl_s: float | None = None,
                     declared_size: int | None = None) -> "UploadWriter":
        """A writer for the bytes of upload `upload_id`; a declared size over the cap is refused before any byte is
        read."""
        if self.closed:
            raise RuntimeError("the file store is closed")
        if not UPLOAD_ID.match(upload_id):
            raise ValueError(f"malformed upload id {upload_id!r}")
        if declared_size is not None:
            self._check_upload_size(declared_size)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._start_janitor()
        return UploadWriter(self, upload_id, ttl_s)

    def _check_upload_size(self, size: int, in_flight: int = 0) -> None:
        if size > self.max_upload_bytes:
            raise PayloadTooLargeError(f"upload of {size} bytes is over this server's limit of "
                                      f"{self.max_upload_bytes} bytes per file")
        if self.uploads_size() - in_flight + size > self.max_uploads_bytes:
            raise PayloadTooLargeError(f"uploads on this server would pass {self.max_uploads_bytes} bytes in all; "
                                      "try again when older uploads have expired")

    def read_local(self, url: str, own_bases: Iterable[str]) -> bytes | None:
        """The bytes behind `url` when it names a file of this store under one of `own_bases` (this server's base
        URLs), else None: a file URL the server handed out is read from disk, never fetched over the network."""
        parts = urllib.parse.urlsplit(url)
        for base in own_bases:
            b = urllib.parse.urlsplit(base)
            if (parts.scheme, parts.netloc.lower()) != (b.scheme, b.netloc.lower()):
                continue
            prefix = b.path.rstrip("/") + "/files/"
            if parts.path.startswith(prefix) and not parts.query:
                stored = self.get(parts.path[len(prefix):])
                if stored is None:
                    return None
                try:
                    return stored.path.read_bytes()
                except OSError:
                    return None
        return None

    def purge(self) -> int:
        """Delete expired files (outputs and uploads; unfinished uploads older than the TTL too); returns how many."""
        cutoff = time.time() - self.ttl_s
        count = 0
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return 0
        try:
            entries += list(self.uploads_dir.iterdir())
        except FileNotFoundError:
            pass
        for path in entries:
            if not (_KEY.match(path.name) or path.parent == self.uploads_dir and path.is_file()):
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


class UploadWriter:
    """The bytes of one upload as they arrive: capped (nothing past the cap is written), sniffed from the first bytes,
    kept in a hidden part file and moved under its id once `finish()` is called. `abort()` (or any refusal) removes
    the part file. Not thread-safe: one writer per request."""

    def __init__(self, store: FileStore, upload_id: str, ttl_s: float | None):
        self.store = store
        self.upload_id = upload_id
        self.ttl_s = store.ttl_s if ttl_s is None else max(1.0, min(float(ttl_s), store.ttl_s))
        fd, tmp = tempfile.mkstemp(dir=store.uploads_dir, prefix=".part-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self.size = 0
        self._head = b""
        self.extension: str | None = None
        self.done = False

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        try:
            if self.size + len(chunk) > self.store.max_upload_bytes:
                raise PayloadTooLargeError(f"upload is over this server's limit of {self.store.max_upload_bytes} "
                                          "bytes per file")
            if self.extension is None:
                self._head = (self._head + chunk)[:SNIFF_BYTES]
                if len(self._head) >= SNIFF_BYTES:
                    self._sniff()
            self._file.write(chunk)
            self.size += len(chunk)
        except BaseException:
            self.abort()
            raise

    def _sniff(self) -> None:
        self.extension = sniff_extension(self._head)
        if self.extension is None:
            raise UnsupportedMediaTypeError(f"the upload is not an image this server reads (it starts with "
                                         f"{self._head[:8].hex(' ') or 'nothing'}); accepted: PNG, JPEG, WEBP, GIF, "
                                         "BMP, TIFF")

    def finish(self) -> StoredFile:
        """Move the whole file under its id; its expiry is now plus this upload's TTL."""
        try:
            if self.extension is None:
                self._sniff()
            self._file.close()
            self.store._check_upload_size(self.size, in_flight=self.size)
            ext = self.extension
            assert ext is not None
            final = self.store.uploads_dir / f"{self.upload_id}.{ext}"
            for other in CONTENT_TYPES:  # one file per id: a retried upload replaces the last one
                (self.store.uploads_dir / f"{self.upload_id}.{other}").unlink(missing_ok=True)
            os.replace(self._tmp, final)
            now = time.time()
            expires_from = now - (self.store.ttl_s - self.ttl_s)  # the store expires files at mtime + its TTL
            os.utime(final, (now, expires_from))
        except BaseException:
            self.abort()
            raise
        self.done = True
        return StoredFile(self.upload_id, final, CONTENT_TYPES[ext], self.size)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


MAX_PARTS = 10_000


class MultipartWriter:
    """One multipart upload: each part lands in its own hidden file (capped: the parts together may not pass the
    per-file cap); `complete(numbers)` streams them in order through an `UploadWriter` (sniffed, moved into place)
    and removes them. Thread-safe: clients send parts concurrently."""

    def __init__(self, store: FileStore, upload_id: str, ttl_s: float | None):
        self.store = store
        self.upload_id = upload_id
        self.ttl_s = ttl_s
        self.created = time.monotonic()
        self._lock = threading.Lock()
        self._parts: dict[int, Path] = {}
        self._reserved = 0
        self.closed = False

    def _reserve(self, n: int) -> None:
        with self._lock:
            if self.closed:
                raise UnsupportedMediaTypeError("this multipart upload is already completed or aborted")
            if self._reserved + n > self.store.max_upload_bytes:
                raise PayloadTooLargeError(f"upload is over this server's limit of {self.store.max_upload_bytes} "
                                          "bytes per file")
            self._reserved += n

    def write_part(self, number: int, chunks: Iterable[bytes]) -> str:
        """Store part `number` from `chunks`; returns its ETag (the part's sha256, quoted)."""
        import hashlib

        if not 1 <= number <= MAX_PARTS:
            raise UnsupportedMediaTypeError(f"part number {number} is out of range 1..{MAX_PARTS}")
        fd, tmp = tempfile.mkstemp(dir=self.store.uploads_dir, prefix=".mp-")
        path, digest, size = Path(tmp), hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    self._reserve(len(chunk))
                    size += len(chunk)
                    digest.update(chunk)
                    f.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= size
            raise
        with self._lock:
            old = self._parts.pop(number, None)
            self._parts[number] = path
        if old is not None:  # a retried part replaces the first try
            with self._lock:
                self._reserved -= old.stat().st_size
            old.unlink(missing_ok=True)
        return f'"{digest.hexdigest()}"'

    def complete(self, numbers: Iterable[int] | None = None) -> StoredFile:
        """Join the parts (`numbers` in that order; None: every part received, ascending)."""
        with self._lock:
            if self.closed:
                raise UnsupportedMediaTypeError("this multipart upload is already completed or aborted")
            self.closed = True
            order = sorted(self._parts) if numbers is None else list(numbers)
            missing = [n for n in order if n not in self._parts]
            paths = [self._parts[n] for n in order if n in self._parts]
        try:
            if missing or not paths:
                raise UnsupportedMediaTypeError(f"cannot complete: parts {missing or 'none'} were not received")
            writer = self.store.begin_upload(self.upload_id, ttl_s=self.ttl_s)
            for path in paths:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        writer.write(chunk)
            return writer.finish()
        finally:
            self.abort()

    def abort(self) -> None:
        with self._lock:
            self.closed = True
            paths, self._parts = list(self._parts.values()), {}
        for path in paths:
            path.unlink(missing_ok=True)
