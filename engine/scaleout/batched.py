"""Batched text-to-image: requests with one `BatchKey` (model, size, steps, guidance, scheduler, adapters) run as one
diffusers call. Each request keeps its own CPU generator (diffusers takes a list, one per image, and draws each
image's noise from its own), so every image is the one its request alone would make; the prompt embeddings (each
through the prompt cache) are concatenated along the batch.

Only one-image text-to-image requests batch; image-conditioned modes, several images per request, or a batch that
fails as a whole run one by one through `Engine.generate` (which keeps its out-of-memory fallback), so each request
gets its own result or its own error.

Step callbacks (one per request, optional): every request of a batch gets the batch's step events, each with its own
row of the batch's latents (for previews). Cancelling one request (its callback raises `JobCancelledError`) does not
stop the batch: that callback is dropped, the batch finishes for the others and the caller drops the cancelled
request's result; only when every request of the batch was cancelled does the batch stop at its next step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import JobCancelledError
from ..pipelines.base import PipelineOutput, StageTimer, fresh_scheduler, seeded_generator
from ..requests import GenerateRequest, Result
from .keys import batch_key

if TYPE_CHECKING:
    from ..api import Engine

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, Any], None]


def batchable(request: GenerateRequest) -> bool:
    return (request.num_images == 1 and request.image is None and request.mask_image is None
            and not request.controlnets)


def generate_batch(engine: "Engine", requests: list[GenerateRequest],
                   step_callbacks: Sequence[StepCallback | None] | None = None) -> list[Result | Exception]:
    callbacks = list(step_callbacks) if step_callbacks is not None else [None] * len(requests)
    if len(requests) > 1 and all(batchable(r) for r in requests) and len({batch_key(r) for r in requests}) == 1:
        try:
            return _together(engine, requests, callbacks)
        except JobCancelledError as e:  # every request was cancelled: nobody wants a one-by-one rerun
            return [e] * len(requests)
        except Exception as e:  # noqa: BLE001 - one by one: each request gets its own result or error
            log.warning("batch of %d failed as a whole (%s: %s); running its requests one by one", len(requests),
                        type(e).__name__, e)
    return [_one(engine, r, cb) for r, cb in zip(requests, callbacks)]


def _one(engine: "Engine", request: GenerateRequest, step_callback: StepCallback | None = None) -> Result | Exception:
    try:
        return engine.generate(request, step_callback=step_callback)
    except Exception as e:  # noqa: BLE001 - the request's own error, returned in its place
        return e


def fan_out(callbacks: Sequence[StepCallback | None]) -> StepCallback:
    """One step callback for a batch: request j's callback gets row j of the latents. A callback that raises
    `JobCancelledError` is dropped (the batch goes on for the rest); the batch stops once all were cancelled."""
    live = dict(enumerate(callbacks))

    def on_step(i: int, n: int, latents: Any) -> None:
        for j, callback in list(live.items()):
            if callback is None:
                continue
            try:
                callback(i, n, latents[j:j + 1] if latents is not None else None)
            except JobCancelledError:
                del live[j]
        if not live:
            raise JobCancelledError("every request of the batch was cancelled")

    return on_step


def _together(engine: "Engine", requests: list[GenerateRequest],
              callbacks: list[StepCallback | None]) -> list[Result | Exception]:
    prepared = [engine._prepare(r) for r in requests]
    slot, _, loras = prepared[0]
    params = [p for _, p, _ in prepared]
    sized = dataclasses.replace(params[0], num_images=len(params))  # the memory plan sizes activations for all
    on_step = fan_out(callbacks) if any(cb is not None for cb in callbacks) else None
    outputs = engine._run(requests[0].model, slot, loras, sized, None,
                          runner=lambda pipe: run_batch(pipe, params, on_step))
    return [Result(images=out.images, seed=p.seed, timings=out.timings, model=r.model, width=p.width,
                   height=p.height, num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                   prompt=p.prompt, extra={"batch_size": len(params)})
            for r, p, out in zip(requests, params, outputs)]


def run_batch(pipeline: Any, params: list[Any], step_callback: StepCallback | None = None) -> list[PipelineOutput]:
    """The family pipeline's three stages once for every job in `params` (same shape; prompts and seeds differ)."""
    first = params[0]
    timer = StageTimer(pipeline.device)
    start = time.perf_counter()
    scope = pipeline.run_context() if pipeline.run_context is not None else contextlib.nullcontext()
    with torch.no_grad(), scope:
        pipe = pipeline.build(first, fresh_scheduler(pipeline.scheduler, first.scheduler, pipeline.family))
        with timer.stage("encode"):
            conds = [pipeline._encode_cached(pipe, p) for p in params]
            cond = {k: None if conds[0][k] is None else torch.cat([c[k] for c in conds]) for k in conds[0]}
        with timer.stage("denoise"):
            try:
                latents = pipeline.denoise(pipe, first, cond, [seeded_generator(p.seed) for p in params],
                                           step_callback)
            finally:
                pipeline._reset_step_cache()
        with timer.stage("decode"):
            images = pipeline.decode(pipe, first, latents)
    timer.timings["total"] = time.perf_counter() - start
    if len(images) != len(params):
        raise RuntimeError(f"a batch of {len(params)} made {len(images)} images")
    return [PipelineOutput(images=[image], timings=dict(timer.timings)) for image in images]
