"""Engine.upscale and `engine upscale` on the tiny AuraSR: sizes, modes, seeds, typed errors."""

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine import Engine, errors


@pytest.fixture(scope="module")
def eng():
    return Engine(device="cpu")


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size, mode", [((70, 50), "RGB"), ((1, 1), "RGB"), ((33, 20), "RGBA"), ((40, 30), "L"),
                                        ((20, 20), "P")])
def test_output_is_exactly_four_times(eng, size, mode):
    img = Image.new(mode, size)
    res = eng.upscale(img, model="tiny-aura-sr", seed=1)
    assert res.image.size == (size[0] * 4, size[1] * 4)
    assert res.image.mode == ("RGBA" if mode == "RGBA" else "RGB")
    assert res.seed == 1 and res.timings["total"] > 0 and res.tiles >= 1


def test_seed_reproducible_and_inputs_equivalent(eng, tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    path = tmp_path / "in.png"
    img.save(path)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    outs = [np.asarray(eng.upscale(x, model="tiny-aura-sr", seed=5).image) for x in (img, arr, str(path), uri)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    drawn = eng.upscale(img, model="tiny-aura-sr")
    assert np.array_equal(np.asarray(eng.upscale(img, model="tiny-aura-sr", seed=drawn.seed).image),
                          np.asarray(drawn.image))
    overlapped = eng.upscale(img, model="tiny-aura-sr", seed=5, overlapping_tiles=True)
    assert overlapped.image.size == (256, 192) and overlapped.tiles > 2


def test_bad_inputs_are_typed_errors(eng, tmp_path):
    truncated = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    cases = [
        (b"not an image at all", "image"),
        (truncated, "image"),
        ("data:image/png;base64,%%%notbase64", "image_url"),
        (Image.new("RGB", (5000, 4000)), "image"),
    ]
    for value, field in cases:
        with pytest.raises(errors.InvalidRequestError) as info:
            eng.upscale(value, model="tiny-aura-sr")
        assert info.value.field.startswith(field)
    with pytest.raises(errors.InvalidRequestError, match="upscale_factor"):
        eng.upscale(Image.new("RGB", (8, 8)), model="tiny-aura-sr", upscale_factor=2)
    with pytest.raises(errors.ModelNotFoundError):
        eng.upscale(Image.new("RGB", (8, 8)), model="tiny-sdxl")
    assert eng.upscale(Image.new("RGB", (8, 8)), model="tiny-aura-sr").image.size == (32, 32)


def test_cli_upscale(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(src)
    out = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "engine.cli", "upscale", "--model", "tiny-aura-sr", "--image", str(src),
                          "--out", str(out), "--overlapping-tiles", "--seed", "2"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (120, 80)
