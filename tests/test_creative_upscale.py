"""Creative upscaling: tiles cover the enlargement with overlaps, blending is seamless, and each tile is an
image-to-image call whose strength follows `creativity` and whose tile ControlNet is weighted by
`shape_preservation`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.pipelines.creative_upscale import (CreativeUpscaleConfig, blend_tiles, creative_upscale, target_size,
                                               tile_boxes)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,tile,overlap", [((256, 192), 128, 16), ((128, 128), 128, 16), ((200, 64), 64, 8),
                                               ((64, 40), 128, 16)])
def test_tiles_cover_the_image_with_overlaps(size, tile, overlap):
    boxes = tile_boxes(*size, tile, overlap)
    covered = np.zeros(size[::-1], dtype=int)
    for left, top, right, bottom in boxes:
        assert right - left == min(tile, size[0]) and bottom - top == min(tile, size[1])
        assert 0 <= left and right <= size[0] and 0 <= top and bottom <= size[1]
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    xs = sorted({b[0] for b in boxes})
    assert all(b - a <= tile - overlap for a, b in zip(xs, xs[1:]))  # neighbours share at least `overlap`


def test_blending_identical_tiles_gives_the_image_back_and_hides_seams():
    image = _noise(256, 192)
    boxes = tile_boxes(256, 192, 128, 32)
    assert np.array_equal(np.asarray(blend_tiles((256, 192), [(b, image.crop(b)) for b in boxes], 32)),
                          np.asarray(image))
    # tiles of two flat colours: across an overlap the result ramps instead of jumping
    tiles = [(b, Image.new("RGB", (128, 128), (0, 0, 0) if i % 2 == 0 else (255, 255, 255)))
             for i, b in enumerate(tile_boxes(224, 128, 128, 32))]
    row = np.asarray(blend_tiles((224, 128), tiles, 32))[64, :, 0].astype(int)
    assert np.abs(np.diff(row)).max() < 20


def test_target_size_rounds_to_the_family_multiple_and_caps():
    assert target_size(Image.new("RGB", (100, 60)), 2, 8) == (200, 120)
    assert target_size(Image.new("RGB", (33, 33)), 1.5, 16) == (48, 48)
    with pytest.raises(InvalidRequestError) as err:
        target_size(Image.new("RGB", (4000, 4000)), 4, 8)
    assert err.value.field == "scale"


@dataclass
class _Out:
    images: list


class RecordingEngine:
    """Stands in for Engine.generate/upscale: records each call and returns the tile it was given, brightened,
    so the test can check what was asked and how the answers were put together."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, **kwargs: Any) -> _Out:
        self.calls.append(kwargs)
        tile = np.asarray(kwargs["image"], dtype=np.int16)
        return _Out([Image.fromarray(np.clip(tile + 10, 0, 255).astype(np.uint8))])

    def load(self, model: str) -> Any:  # pragma: no cover - registry models only here
        raise AssertionError(model)


def test_each_tile_is_image_to_image_with_creativity_and_a_weighted_tile_controlnet():
    engine = RecordingEngine()
    config = CreativeUpscaleConfig(model="tiny-sd15", scale=2, creativity=0.4, shape_preservation=0.7, detail=0,
                                   num_inference_steps=10, seed=5, prompt="a cat", tile_size=64)
    out = creative_upscale(engine, _noise(48, 40), config)  # type: ignore[arg-type]
    assert out.image.size == (96, 80) and out.seed == 5 and out.tiles == len(engine.calls) == 4
    for call in engine.calls:
        assert call["model"] == "tiny-sd15" and call["strength"] == 0.4 and call["seed"] == 5
        assert call["prompt"] == "a cat high quality, highly detailed, high resolution, sharp"
        (cn,) = call["controlnets"]
        assert cn["model"] == "tiny-controlnet-sd15" and cn["conditioning_scale"] == 0.7
        assert cn["image"] is call["image"] and (call["width"], call["height"]) == call["image"].size == (64, 64)
    enlarged = np.asarray(_noise(48, 40).resize((96, 80), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(out.image, dtype=np.int16) - np.clip(enlarged + 10, 0, 255)).max() <= 1


def test_no_creativity_is_the_enlargement_and_no_shape_preservation_drops_the_controlnet():
    engine = RecordingEngine()
    base = CreativeUpscaleConfig(model="tiny-sd15", scale=2, detail=0, tile_size=64, seed=1)
    out = creative_upscale(engine, _noise(32, 32), CreativeUpscaleConfig(**{**base.__dict__, "creativity": 0.0}))
    assert not engine.calls and out.tiles == 0 and out.image.size == (64, 64)
    creative_upscale(engine, _noise(32, 32), CreativeUpscaleConfig(**{**base.__dict__, "shape_preservation": 0.0}))
    assert engine.calls and all("controlnets" not in c for c in engine.calls)
    creative_upscale(engine, _noise(32, 32), CreativeUpscaleConfig(**{**base.__dict__, "creativity": 0.01,
                                                                      "num_inference_steps": 20}))
    assert engine.calls[-1]["strength"] == pytest.approx(0.05)  # at least one of the 20 steps runs
