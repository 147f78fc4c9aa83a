"""fal's storage routes, over the engine's file store: what the official clients call to upload a file before a request.

JS client (`fal.storage.upload`, and any `Blob`/`File` in an input):
  POST /storage/upload/initiate[?storage_type=...]  {content_type, file_name}  -> {upload_url, file_url}
  PUT  {upload_url}                                  the bytes (sent without credentials: the URL is the capability)
  POST /storage/upload/initiate-multipart            (above 90 MB) -> {upload_url, file_url}
  PUT  {upload_url}/{part_number}                    -> {partNumber, etag}
  POST {upload_url}/complete                         {parts: [{partNumber, etag}]} -> {file_url}
Python client (`upload_file`, `upload_image`, `upload`; repository "fal_v3", then "fal" = the routes above):
  POST /storage/auth/token?storage_type=fal-cdn-v3  {} -> {token, token_type, base_url, expires_at}
  POST /files/upload                                 the bytes, `Authorization: Bearer <token>` -> {access_url}
  POST /files/upload/multipart                       (above 100 MB) -> {access_url, uploadId}
  PUT  {access_url}/multipart/{uploadId}/{n}         -> ETag;  POST .../complete {parts}

Every upload lands in the file store (`engine.runtime.files`): capped per file and in all (413 before the whole is
stored; a declared Content-Length over the cap is refused before a byte is read), sniffed (images only, 415
otherwise), expiring with the store's TTL or sooner when the client's lifecycle header (`X-Fal-Object-Lifecycle`,
`{"expiration_duration_seconds": N}`) asks. The file URL is `{server}/files/{id}`, and the server reads such URLs
from disk when they come back as inputs (no outbound fetch). Upload URLs are single-use and expire after
`SLOT_TTL_S`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidRequestError, TooManyUploadsError, UnauthorizedError, UploadNotFoundError
from ..runtime.files import FileStore, MultipartWriter, UploadWriter
from .tokens import TokenSigner

SLOT_TTL_S = 900.0
STORAGE_TOKEN_TTL_S = 3600.0
MAX_SLOTS = 10_000
MAX_NAME = 1024


@dataclass
class _Slot:
    upload_id: str
    ttl_s: float | None
    expires: float
    multipart: MultipartWriter | None = None
    used: bool = False


@dataclass
class Slots:
    """Open upload URLs: secret slot id -> where its bytes go. Single use; forgotten after `SLOT_TTL_S`."""

    ttl_s: float = SLOT_TTL_S
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, upload_id: str, ttl_s: float | None, multipart: MultipartWriter | None = None,
             slot_id: str | None = None) -> str:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, s in self._slots.items() if s.expires < now]:
                stale = self._slots.pop(key)
                if stale.multipart is not None:
                    stale.multipart.abort()
            if len(self._slots) >= MAX_SLOTS:
                raise TooManyUploadsError(f"more than {MAX_SLOTS} uploads are open; try again later")
            slot_id = slot_id or secrets.token_urlsafe(24)
            self._slots[slot_id] = _Slot(upload_id, ttl_s, now + self.ttl_s, multipart)
            return slot_id

    def take(self, slot_id: str) -> _Slot:
        """The slot for a single PUT (closed by it)."""
        with self._lock:
            slot = self._slots.pop(slot_id, None)
        if slot is None or slot.expires < time.monotonic():
            raise UploadNotFoundError("no such upload URL (unknown, used or expired)")
        return slot

    def peek(self, slot_id: str) -> _Slot:
        """The slot of a multipart upload (stays open until completed)."""
        with self._lock:
            slot = self._slots.get(slot_id)
        if slot is None or slot.expires < time.monotonic() or slot.multipart is None:
            raise UploadNotFoundError("no such multipart upload (unknown, completed or expired)")
        return slot

    def close(self, slot_id: str) -> None:
        with self._lock:
            self._slots.pop(slot_id, None)


def lifecycle_ttl(request: Request) -> float | None:
    """`expiration_duration_seconds` from fal's lifecycle headers (the store caps it at its own TTL)."""
    raw = request.headers.get("x-fal-object-lifecycle") or request.headers.get("x-fal-object-lifecycle-preference")
    if not raw:
        return None
    try:
        value = json.loads(raw).get("expiration_duration_seconds")
    except (ValueError, AttributeError):
        raise InvalidRequestError("x-fal-object-lifecycle", "must be a JSON object") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidRequestError("x-fal-object-lifecycle.expiration_duration_seconds",
                                  "must be a positive number of seconds")
    return float(value)


def _declared_size(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


async def receive_into(request: Request, writer: UploadWriter) -> None:
    """The request body through `writer`, chunk by chunk (caps checked as it arrives); aborted on any failure."""
    try:
        async for chunk in request.stream():
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise


async def small_body(request: Request, limit: int = 64 * 1024) -> bytes:
    """A small JSON body (control messages), read with a cap."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequestError("body", "too large", f"at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _initiate_body(request: Request) -> dict[str, Any]:
    raw = await small_body(request)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise InvalidRequestError("body", "must be JSON: {content_type, file_name}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object: {content_type, file_name}")
    for name in ("content_type", "file_name"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME):
            raise InvalidRequestError(name, "must be a string", f"at most {MAX_NAME} characters")
    return body


def add_storage_routes(app: FastAPI, files: FileStore, signer: TokenSigner, auth: list[Any],
                       key_ok: Callable[[str | None], bool], requires_auth: bool) -> Slots:
    """Register the storage routes on `app` (before any catch-all route). Returns the open-slot table."""
    slots = Slots()

    def file_url(request: Request, upload_id: str) -> str:
        return f"{request.base_url}files/{upload_id}"

    def storage_auth(request: Request) -> None:
        """`Authorization: Bearer <storage token>` (the CDN flow) or the server's key."""
        header = request.headers.get("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            signer.verify(value.strip(), "storage")
            return
        if requires_auth and not key_ok(header or None):
            raise UnauthorizedError("missing or wrong credentials (`Authorization: Key <key>` or a storage token)")

    # -- JS client, and the Python client's fallback repository ----------------------------------------------------
    @app.post("/storage/upload/initiate", dependencies=auth, tags=["storage"],
              summary="start an upload: answers a single-use upload URL and the file's URL")
    async def initiate(request: Request) -> JSONResponse:
        await _initiate_body(request)
        upload_id = files.new_upload_id()
        slot = slots.open(upload_id, lifecycle_ttl(request))
        return JSONResponse({"upload_url": f"{request.base_url}storage/upload/{slot}",
                             "file_url": file_url(request, upload_id)})

    @app.put("/storage/upload/{slot_id}", tags=["storage"], summary="the bytes of an initiated upload")
    async def put_upload(slot_id: str, request: Request) -> JSONResponse:
        slot = slots.take(slot_id)
        writer = files.begin_upload(slot.upload_id, ttl_s=slot.ttl_s, declared_size=_declared_size(request))
        await receive_into(request, writer)
        stored = await run_in_threadpool(writer.finish)
        return JSONResponse({"file_url": file_url(request, stored.key), "content_type": stored.content_type,
                             "size": stored.size})

    @app.post("/storage/upload/initiate-multipart", dependencies=auth, tags=["storage"],
              summary="start a multipart upload (the JS client, above 90 MB)")
    async def initiate_multipart(request: Request) -> JSONResponse:
        await _initiate_body(request)
        upload_id = files.new_upload_id()
        ttl = lifecycle_ttl(request)
        slot = slots.open(upload_id, ttl, files.begin_multipart(upload_id, ttl_s=ttl))
        return JSONResponse({"upload_url": f"{request.base_url}storage/upload/multipart/{slot}",
                             "file_url": file_url(request, upload_id)})

    @app.put("/storage/upload/multipart/{slot_id}/{part_number}", tags=["storage"], summary="one part")
    async def put_part(slot_id: str, part_number: int, request: Request) -> JSONResponse:
        slot = slots.peek(slot_id)
        etag = await _write_part(slot, part_number, request)
        return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": etag})

    @app.post("/storage/upload/multipart/{slot_id}/complete", tags=["storage"], summary="join the parts")
    async def complete(slot_id: str, request: Request) -> JSONResponse:
        slot = slots.peek(slot_id)
        stored = await _complete(slot, request)
        slots.close(slot_id)
        return JSONResponse({"file_url": file_url(request, stored.key)})

    async def _write_part(slot: _Slot, part_number: int, request: Request) -> str:
        assert slot.multipart is not None
        declared = _declared_size(request)
        if declared is not None and declared > files.max_upload_bytes:
            files._check_upload_size(declared)  # raises: refused before a byte is read
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # one part (10 MB from fal's clients) at a time in memory
            size += len(chunk)
            if size > files.max_upload_bytes:
                files._check_upload_size(size)
            chunks.append(chunk)
        return await run_in_threadpool(slot.multipart.write_part, part_number, chunks)

    async def _complete(slot: _Slot, request: Request) -> Any:
        assert slot.multipart is not None
        try:
            body = json.loads(await small_body(request, 1 << 20) or b"{}")
            parts = body.get("parts") if isinstance(body, dict) else None
            numbers = None if not parts else [int(p.get("partNumber", p.get("part_number"))) for p in parts]
        except (ValueError, TypeError, AttributeError):
            raise InvalidRequestError("parts", "must be a list of {partNumber, etag}") from None
        return await run_in_threadpool(slot.multipart.complete, numbers)

    # -- Python client, repository "fal_v3" (its CDN flow) --------------------------------------------------------
    @app.post("/storage/auth/token", dependencies=auth, tags=["storage"],
              summary="a short-lived storage token for POST /files/upload (the Python client's CDN flow)")
    async def storage_token(request: Request) -> JSONResponse:
        token, claims = signer.issue("storage", (), STORAGE_TOKEN_TTL_S)
        expires = datetime.fromtimestamp(claims.expires_at, timezone.utc).isoformat()
        return JSONResponse({"token": token, "token_type": "Bearer", "base_url": str(request.base_url).rstrip("/"),
                             "expires_at": expires})

    @app.post("/files/upload", tags=["storage"], summary="upload the body as one file -> {access_url}")
    async def cdn_upload(request: Request) -> JSONResponse:
        storage_auth(request)
        upload_id = files.new_upload_id()
        writer = files.begin_upload(upload_id, ttl_s=lifecycle_ttl(request), declared_size=_declared_size(request))
        await receive_into(request, writer)
        stored = await run_in_threadpool(writer.finish)
        return JSONResponse({"access_url": file_url(request, stored.key), "content_type": stored.content_type})

    @app.post("/files/upload/multipart", tags=["storage"], summary="start a multipart upload (CDN flow)")
    async def cdn_multipart(request: Request) -> JSONResponse:
        storage_auth(request)
        upload_id = files.new_upload_id()
        ttl = lifecycle_ttl(request)
        slot = slots.open(upload_id, ttl, files.begin_multipart(upload_id, ttl_s=ttl))
        return JSONResponse({"access_url": file_url(request, upload_id), "uploadId": slot})

    @app.put("/files/{upload_id}/multipart/{slot_id}/{part_number}", tags=["storage"], summary="one part")
    async def cdn_part(upload_id: str, slot_id: str, part_number: int, request: Request) -> Response:
        storage_auth(request)
        slot = slots.peek(slot_id)
        if slot.upload_id != upload_id:
            raise UploadNotFoundError("no such multipart upload")
        etag = await _write_part(slot, part_number, request)
        return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": etag})

    @app.post("/files/{upload_id}/multipart/{slot_id}/complete", tags=["storage"], summary="join the parts")
    async def cdn_complete(upload_id: str, slot_id: str, request: Request) -> JSONResponse:
        storage_auth(request)
        slot = slots.peek(slot_id)
        if slot.upload_id != upload_id:
            raise UploadNotFoundError("no such multipart upload")
        stored = await _complete(slot, request)
        slots.close(slot_id)
        return JSONResponse({"access_url": file_url(request, stored.key)})

    return slots
