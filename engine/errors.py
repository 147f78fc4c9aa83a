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
