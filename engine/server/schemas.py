"""Response schemas of the HTTP server, for `/openapi.json` (the request schemas are `engine.endpoints`' input
models, the same ones that validate every body). fal's JSON shapes, as `FAL_PROTOCOL.md` lists them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageOutput(_Open):
    url: str  # a server URL (/files/...) or, with sync_mode, a data URI
    content_type: str
    file_name: str | None = None
    file_size: int | None = None
    width: int
    height: int


class TextToImageOutput(_Open):
    images: list[ImageOutput]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool | None]
    safety_checker: dict[str, Any] | None = None
    prompt: str


class UpscaleOutput(_Open):
    image: ImageOutput
    timings: dict[str, float]
    seed: int | None = None


class ProgressEvent(_Open):
    """One server-sent event of `/stream` before the result (the last event is the output object)."""

    type: Literal["progress"]
    request_id: str
    step: int
    num_steps: int
    preview: ImageOutput | None = None


class SubmitResponse(BaseModel):
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    status: Literal["IN_QUEUE"]
    queue_position: int


class LogEntry(_Open):
    message: str
    level: str
    source: str
    timestamp: str


class QueueStatus(BaseModel):
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    queue_position: int | None = None
    logs: list[LogEntry] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None


class CancelResponse(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]
    detail: str | None = None
    error_type: str | None = None


class FieldError(_Open):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """fal's error JSON; for invalid input (422) `detail` lists the field errors as FastAPI writes them."""

    detail: str | list[FieldError]
    error_type: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "missing or wrong API key", 404: "unknown app or request", 413: "body too large",
            422: "invalid input: `detail` lists the field errors", 500: "internal error"}
    return {status: {"model": ErrorBody, "description": text.get(status, "error")} for status in statuses}


OUTPUTS: dict[str, type[BaseModel]] = {"text-to-image": TextToImageOutput, "upscale": UpscaleOutput,
                                      "creative-upscale": UpscaleOutput}
