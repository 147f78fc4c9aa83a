"""Creative upscaling (fal's `creative-upscaler`): enlarge, then let an SD model redraw the enlargement tile by tile.

1. The input is enlarged by `scale`: by an AuraSR model when one is given (4x, then resized to the target), else
   with Lanczos; `detail` sharpens the enlargement (an unsharp mask of `detail` x 100 %), so the redraw has edges
   to work from.
2. The enlargement is cut into overlapping tiles of the model's native size; each tile is redrawn by
   `Engine.generate` as image-to-image with `strength = creativity` (how far the result may move from the
   enlargement), and a tile ControlNet fed the same tile with `conditioning_scale = shape_preservation` (how firmly
   the shapes are held).
3. The tiles are blended back with weights that fall off linearly inside each overlap, so no seam shows.

Each tile is an ordinary generate call, so it gets the model's compiled pipeline, memory plan and LoRA handling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InvalidRequestError
from ..registry import find_spec

if TYPE_CHECKING:
    from ..api import Engine

MAX_OUTPUT_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class CreativeUpscaleConfig:
    """What to do (fal's creative-upscaler fields, named as fal names them)."""

    model: str
    prompt: str = ""
    prompt_suffix: str = " high quality, highly detailed, high resolution, sharp"
    negative_prompt: str = ("blurry, low resolution, bad, ugly, low quality, pixelated, interpolated, compression "
                            "artifacts, noisey, grainy")
    scale: float = 2.0
    creativity: float = 0.5
    detail: float = 1.0
    shape_preservation: float = 0.25
    guidance_scale: float = 7.5
    num_inference_steps: int = 20
    seed: int | None = None
    controlnet: str | None = None  # registry id of the tile ControlNet; None: the model's `tile_controlnet`
    upscaler: str | None = None  # an AuraSR model id for the first enlargement; None: Lanczos
    tile_size: int | None = None  # None: the model's default width
    tile_overlap: float = 0.125  # of the tile size


@dataclass
class CreativeUpscaleResult:
    image: Image.Image
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 0


def target_size(image: Image.Image, scale: float, multiple: int = 8) -> tuple[int, int]:
    """The output size: `scale` times the input, rounded to the family's multiple; a 422 on `scale` when too big."""
    w = max(multiple, int(round(image.width * scale / multiple)) * multiple)
    h = max(multiple, int(round(image.height * scale / multiple)) * multiple)
    if w * h > MAX_OUTPUT_PIXELS:
        raise InvalidRequestError("scale", f"{image.width}x{image.height} x{scale} is {w}x{h}, over the output limit",
                                  f"at most {MAX_OUTPUT_PIXELS} pixels")
    return w, h


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of `tile`-sized tiles covering the image, neighbours sharing `overlap`
    pixels; the last row/column is moved in to end at the border (a small image is one tile of its own size)."""
    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        step = max(1, tile - overlap)
        out = list(range(0, length - tile, step))
        return out + [length - tile]

    tw, th = min(tile, width), min(tile, height)
    return [(x, y, x + tw, y + th) for y in starts(height) for x in starts(width)]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    w = np.ones(length, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        if not at_start:
            w[:overlap] = np.minimum(w[:overlap], ramp)
        if not at_end:
            w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def blend_tiles(size: tuple[int, int], tiles: list[tuple[tuple[int, int, int, int], Image.Image]],
                overlap: int) -> Image.Image:
    """Weighted average of the tiles; weights fall off linearly across each overlap (never to zero)."""
    width, height = size
    acc = np.zeros((height, width, 3), dtype=np.float32)
    total = np.zeros((height, width, 1), dtype=np.float32)
    for (left, top, right, bottom), image in tiles:
        wx = _ramp(right - left, overlap, left == 0, right == width)
        wy = _ramp(bottom - top, overlap, top == 0, bottom == height)
        weight = (wy[:, None] * wx[None, :])[..., None]
        acc[top:bottom, left:right] += np.asarray(image.convert("RGB"), dtype=np.float32) * weight
        total[top:bottom, left:right] += weight
    return Image.fromarray(np.clip(np.rint(acc / np.maximum(total, 1e-6)), 0, 255).astype(np.uint8))


def enlarge(engine: "Engine", image: Image.Image, size: tuple[int, int], upscaler: str | None,
            seed: int | None) -> Image.Image:
    """Step 1: AuraSR (4x) then a resize to `size`, or Lanczos straight to `size`."""
    if upscaler is not None:
        image = engine.upscale(image=image, model=upscaler, seed=seed).image.convert("RGB")
    return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image


def creative_upscale(engine: "Engine", image: Image.Image, config: CreativeUpscaleConfig, *,
                     on_tile: Callable[[int, int], None] | None = None) -> CreativeUpscaleResult:
    """Upscale `image` by `config.scale` and redraw it tile by tile (see the module docstring)."""
    start = time.perf_counter()
    spec = find_spec(config.model)
    family = spec.family_spec if spec is not None else engine.load(config.model).family
    image = image.convert("RGB")
    size = target_size(image, config.scale, family.size_multiple)
    seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(0, 2**31 - 1))
    timings: dict[str, float] = {}
    enlarged = enlarge(engine, image, size, config.upscaler, seed)
    if config.detail > 0:
        enlarged = enlarged.filter(ImageFilter.UnsharpMask(radius=2, percent=int(round(100 * config.detail)),
                                                           threshold=2))
    timings["enlarge"] = time.perf_counter() - start
    if config.creativity <= 0:  # nothing may change: the sharpened enlargement is the answer
        timings["total"] = time.perf_counter() - start
        return CreativeUpscaleResult(enlarged, seed, timings, 0)
    tile = config.tile_size or (spec.defaults.width if spec is not None and spec.defaults.width else 512)
    tile = max(family.min_size, tile - tile % family.size_multiple)
    overlap = int(tile * config.tile_overlap) // family.size_multiple * family.size_multiple
    boxes = tile_boxes(size[0], size[1], tile, overlap)
    controlnet = config.controlnet or (spec.tile_controlnet if spec is not None else None)
    strength = max(config.creativity, 1.0 / config.num_inference_steps)  # at least one denoising step
    prompt = (config.prompt + config.prompt_suffix).strip()
    redrawn = []
    denoise_start = time.perf_counter()
    for i, box in enumerate(boxes):
        piece = enlarged.crop(box)
        kwargs: dict[str, Any] = dict(
            model=config.model, prompt=prompt, negative_prompt=config.negative_prompt, image=piece,
            strength=strength, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            seed=seed, width=piece.width, height=piece.height)
        if controlnet is not None and config.shape_preservation > 0:
            kwargs["controlnets"] = [{"model": controlnet, "image": piece,
                                      "conditioning_scale": config.shape_preservation}]
        redrawn.append((box, engine.generate(**kwargs).images[0]))
        if on_tile is not None:
            on_tile(i + 1, len(boxes))
    timings["redraw"] = time.perf_counter() - denoise_start
    out = blend_tiles(size, redrawn, overlap)
    timings["total"] = time.perf_counter() - start
    return CreativeUpscaleResult(out, seed, timings, len(boxes))


__all__ = ["CreativeUpscaleConfig", "CreativeUpscaleResult", "blend_tiles", "creative_upscale", "tile_boxes",
           "target_size"]
