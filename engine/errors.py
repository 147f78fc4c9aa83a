"""Typed errors: every failure a caller can cause maps to one of these, so the API, the CLI and the
server can report it precisely (field, allowed range) instead of surfacing a traceback."""

from __future__ import annotations

from typing import Any, Sequence


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    error_type: str = "engine_error"
    http_status: int = 500

    def to_dict(self) -> dict[str, Any]:
        return {"detail": str(self), "error_type": self.error_type}


class InvalidRequestError(EngineError, ValueError):
    """An argument is out of range or malformed; names the field and what is allowed."""

    error_type = "invalid_request"
    http_status = 422

    def __init__(self, field: str, message: str, allowed: str | None = None, value: Any = None):
        self.field = field
        self.allowed = allowed
        self.value = value
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)

    def to_dict(self) -> dict[str, Any]:
        item = {"loc": ["body", *self.field.split(".")], "msg": str(self), "type": self.error_type}
        if self.allowed:
            item["ctx"] = {"allowed": self.allowed}
        return {"detail": [item], "error_type": self.error_type}


class ModelNotFoundError(EngineError, LookupError):
    """The model argument is neither a known id, an existing path, nor a reachable hub repository."""

    error_type = "model_not_found"
    http_status = 404

    def __init__(self, model: str, message: str, known: Sequence[str] = ()):
        self.model = model
        self.known = list(known)
        text = f"model {model!r}: {message}"
        if self.known:
            text += f"; known ids: {', '.join(self.known)}"
        super().__init__(text)


class HubUnavailableError(ModelNotFoundError):
    """A hub id could not be fetched (offline, missing, gated) and is not in the local cache."""

    error_type = "hub_unavailable"


class ModelLoadError(EngineError):
    """A checkpoint exists but cannot be loaded (corrupted, unrecognised layout, shape mismatch)."""

    error_type = "model_load_error"
    http_status = 422


class UnsafeCheckpointError(ModelLoadError):
    """A pickle-based checkpoint was given without `allow_pickle=True`."""

    error_type = "unsafe_checkpoint"


class JobCancelledError(EngineError):
    """The job was cancelled before it finished."""

    error_type = "cancelled"
    http_status = 499


class InsufficientMemoryError(EngineError):
    """No memory plan fits the device budget (or the smallest one ran out of memory); names the budget needed."""

    error_type = "insufficient_memory"
    http_status = 507

    def __init__(self, message: str, needed_bytes: int | None = None, budget_bytes: int | None = None):
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.needed_bytes is not None:
            out["needed_bytes"] = self.needed_bytes
        if self.budget_bytes is not None:
            out["budget_bytes"] = self.budget_bytes
        return out


class RefusedSourceError(InvalidRequestError):
    """An untrusted caller named a source it may not use (a local path, an unlisted model, a hub id this server will
    not download). The text depends only on what was named, never on what exists on the server's disk."""

    error_type = "refused_source"


class OutsideProfileError(InvalidRequestError):
    """A call needs shapes no built export engine (TensorRT, ONNX) takes, and its profile policy builds none: a 422
    naming the request field behind the first axis out of range; `allowed` lists the engines that are built
    (made by `engine.compiler.export.profiles.outside_profile_error`)."""


# -- the fal protocol: app ids, request ids, the server ------------------------------------------------------------
class AppNotFoundError(EngineError, LookupError):
    """The path names no app id this engine serves."""

    error_type = "app_not_found"
    http_status = 404


class EndpointUnavailableError(EngineError):
    """The app id is known but no usable model is configured for it (a missing or wrong endpoint mapping)."""

    error_type = "not_implemented"
    http_status = 501


class RequestNotFoundError(EngineError, LookupError):
    """No request with this id (never submitted, or its result expired)."""

    error_type = "request_not_found"
    http_status = 404


class PayloadTooLargeError(EngineError):
    """An HTTP request body over the server's limit."""

    error_type = "payload_too_large"
    http_status = 413


class UnauthorizedError(EngineError):
    """A missing or wrong API key (or a token that is forged, expired or not valid for what it is used for)."""

    error_type = "unauthorized"
    http_status = 401


class UnsupportedMediaTypeError(EngineError):
    """An upload whose bytes are not a format the engine reads (sniffed from the content, never the header)."""

    error_type = "unsupported_media_type"
    http_status = 415


class UploadNotFoundError(EngineError, LookupError):
    """An upload URL that is unknown, already used or expired."""

    error_type = "upload_not_found"
    http_status = 404


class TooManyUploadsError(EngineError):
    """More uploads are open at once than the server keeps track of."""

    error_type = "too_many_uploads"
    http_status = 429


# -- the job queue and its durable store ---------------------------------------------------------------------------
class JobTimeoutError(EngineError):
    """The job ran (or waited) past its deadline."""

    error_type = "request_timeout"
    http_status = 504


class JobInterruptedError(EngineError):
    """The server stopped while the job ran (or, unresumable, while it waited): submit it again."""

    error_type = "interrupted"
    http_status = 503


class ReplicaDiedError(EngineError):
    """The scale-out worker replica running this job died (it is replaced; queued jobs go on): submit it again."""

    error_type = "replica_died"
    http_status = 503


class RestoredJobError(EngineError):
    """A finished job's error as read back from the job store: same message, `error_type`, status and body."""

    def __init__(self, stored: dict[str, Any]):
        super().__init__(stored.get("message", ""))
        self.error_type = str(stored.get("error_type") or "internal_error")
        self.http_status = int(stored.get("http_status") or 500)
        self.original_type = stored.get("type")
        self._body = stored.get("body")

    def to_dict(self) -> dict[str, Any]:
        return self._body if isinstance(self._body, dict) else super().to_dict()


class StateDirLockedError(EngineError):
    """Another process serves from this state dir."""

    error_type = "state_dir_locked"


def error_type_of(error: BaseException) -> str:
    """The `error_type` a caller sees for `error` (anything not raised on purpose is an internal error)."""
    return error.error_type if isinstance(error, EngineError) else "internal_error"
