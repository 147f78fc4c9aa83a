"""Keys that decide where a request runs and what it may share a model call with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..requests import GenerateRequest


def adapter_key(request: GenerateRequest) -> str:
    """The request's adapter set as a short stable id ("" without adapters): the routing id that sends a request
    to a replica already holding (fused) the same set. Order and scales count: they change the weights."""
    if not request.loras:
        return ""
    text = json.dumps([[lora.path, lora.scale] for lora in request.loras], separators=(",", ":"))
    return "loras-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys run as one batch: one model, one size, one step count, one scheduler, one guidance
    and one adapter set. Prompts and seeds may differ (each image keeps its own generator)."""

    model: str
    width: int | None
    height: int | None
    steps: int | None
    guidance_scale: float | None
    true_cfg_scale: float
    scheduler: str | None
    max_sequence_length: int | None
    adapters: str
    negative: bool  # with or without a negative prompt (CFG branches differ)


def batch_key(request: GenerateRequest) -> BatchKey:
    return BatchKey(request.model, request.width, request.height, request.num_inference_steps,
                    request.guidance_scale, request.true_cfg_scale, request.scheduler, request.max_sequence_length,
                    adapter_key(request), request.negative_prompt is not None)


def describe(key: BatchKey) -> dict[str, Any]:
    return {"model": key.model, "size": [key.width, key.height], "steps": key.steps, "adapters": key.adapters}
