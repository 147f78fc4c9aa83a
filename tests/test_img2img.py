"""Image-to-image (`image`, `strength`) reproduces diffusers' Img2Img pipelines (StableDiffusionImg2ImgPipeline,
StableDiffusionXLImg2ImgPipeline, FluxImg2ImgPipeline) on tiny models in fp32: same image for the same seed over
several strengths, a non-square size and batches; the output follows the input image; bad inputs are 422s naming
the field. Opt levels and backends: the image-to-image, inpainting and ControlNet rows of tests/test_matrix.py."""

import base64
import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import images_close
from engine import errors
from stock_models import BUILDERS

IMG2IMG = {"sd15": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline",
           "flux": "FluxImg2ImgPipeline"}
# (width, height, strength, num_images)
CASES = [(64, 64, 0.5, 1), (96, 64, 0.75, 2), (64, 112, 1.0, 1)]
PROMPT = "a lighthouse at dusk"


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)  # smooth, like a picture


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    built = {}
    for family, builder in BUILDERS.items():
        path = tmp_path_factory.mktemp(f"img2img-{family}")
        pipe = builder(path)
        built[family] = (str(path), pipe)
    return built


def family_kwargs(family: str) -> dict:
    return {"max_sequence_length": 64} if family == "flux" else {}


def stock_img2img(pipe, family, image, strength, n, seed, guidance=5.0, steps=4, **extra):
    cls = getattr(diffusers, IMG2IMG[family])
    stock = cls.from_pipe(pipe)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, image=image, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed), **extra,
                  **family_kwargs(family))
    if strength is not None:
        kwargs["strength"] = strength
    if family == "flux":
        kwargs.update(width=image.width, height=image.height)
    return stock(**kwargs).images


def arrays(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


@pytest.mark.parametrize("family", list(IMG2IMG))
def test_img2img_matches_stock_diffusers(engine, stock, family):
    path, pipe = stock[family]
    for i, (w, h, strength, n) in enumerate(CASES):
        image = random_image(w, h, seed=i)
        expected = stock_img2img(pipe, family, image, strength, n, seed=7 + i)
        got = engine.generate(model=path, prompt=PROMPT, image=image, strength=strength, num_inference_steps=4,
                              guidance_scale=5.0, num_images=n, seed=7 + i, **family_kwargs(family))
        assert [im.size for im in got.images] == [(w, h)] * n  # the output follows the input image
        diff = np.abs(arrays(expected) - arrays(got.images)).max()
        assert diff <= 1, f"{family} {w}x{h} strength={strength} n={n}: max difference {diff} levels"


@pytest.mark.parametrize("family", list(IMG2IMG))
def test_img2img_default_strength_is_the_diffusers_class_default(engine, stock, family):
    path, pipe = stock[family]
    image = random_image(64, 64, seed=3)
    expected = stock_img2img(pipe, family, image, None, 1, seed=2, steps=5)
    got = engine.generate(model=path, prompt=PROMPT, image=image, num_inference_steps=5, guidance_scale=5.0, seed=2,
                          **family_kwargs(family))
    assert np.abs(arrays(expected) - arrays(got.images)).max() <= 1
    # and the image matters: another input image gives another output
    other = engine.generate(model=path, prompt=PROMPT, image=random_image(64, 64, seed=4), num_inference_steps=5,
                            guidance_scale=5.0, seed=2, **family_kwargs(family))
    assert not images_close(got.images, other.images)[0]


def test_img2img_size_rounds_down_or_follows_width_height(engine, stock):
    path, pipe = stock["flux"]
    image = random_image(100, 70, seed=5)
    got = engine.generate(model=path, prompt=PROMPT, image=image, strength=0.6, num_inference_steps=2, seed=1,
                          max_sequence_length=64)
    assert got.images[0].size == (96, 64) and (got.width, got.height) == (96, 64)  # multiple of 16 for FLUX
    resized = engine.generate(model=path, prompt=PROMPT, image=image, strength=0.6, num_inference_steps=2, seed=1,
                              width=64, height=80, max_sequence_length=64)
    assert resized.images[0].size == (64, 80)
    sd_path, _ = stock["sd15"]
    assert engine.generate(model=sd_path, prompt=PROMPT, image=image, num_inference_steps=2,
                           seed=1).images[0].size == (96, 64)  # multiple of 8 for SD


def test_img2img_takes_the_same_image_forms_as_upscale(engine, stock, tmp_path):
    path, _ = stock["sd15"]
    image = random_image(64, 64, seed=6)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    file = tmp_path / "in.png"
    file.write_bytes(buf.getvalue())
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    kw = dict(model=path, prompt=PROMPT, strength=0.5, num_inference_steps=2, seed=3)
    ref = arrays(engine.generate(image=image, **kw).images)
    for form in (np.asarray(image), str(file), uri, buf.getvalue()):
        assert np.array_equal(arrays(engine.generate(image=form, **kw).images), ref)


def test_img2img_bad_inputs_name_the_field(engine, stock):
    path, _ = stock["sd15"]
    image = random_image(64, 64)
    kw = dict(model=path, prompt=PROMPT, num_inference_steps=2)
    cases = [
        (dict(image=image, strength=1.5), "strength"),
        (dict(image=image, strength=-0.1), "strength"),
        (dict(strength=0.5), "strength"),  # no image
        (dict(image=image, strength=0.2), "strength"),  # 0.2 * 2 steps leaves no step (diffusers would raise)
        (dict(image=image, strength=0.0), "strength"),
        (dict(image="data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()), "image"),
        (dict(image=b"not an image"), "image"),
        (dict(image=random_image(40, 40)), "image"),  # rounds to 40x40: below the family's minimum size
        (dict(image=image, mask_image=random_image(64, 72)), "mask_image"),
        (dict(mask_image=image), "image"),  # a mask without an image
    ]
    for extra, field in cases:
        with pytest.raises(errors.InvalidRequestError) as info:
            engine.generate(**kw, **extra)
        assert info.value.field == field, (extra.keys(), info.value)


def test_flux_strength_keeps_a_rounded_up_step(engine, stock):
    """FLUX keeps ceil(steps * strength) steps: 0.3 of 2 steps is one step (SD would run none, and refuses)."""
    path, pipe = stock["flux"]
    image = random_image(64, 64, seed=9)
    expected = stock_img2img(pipe, "flux", image, 0.3, 1, seed=1, steps=2)
    got = engine.generate(model=path, prompt=PROMPT, image=image, strength=0.3, num_inference_steps=2,
                          guidance_scale=5.0, seed=1, max_sequence_length=64)
    assert np.abs(arrays(expected) - arrays(got.images)).max() <= 1


def test_untrusted_callers_cannot_name_local_image_paths(engine, stock, tmp_path):
    from engine.loading import CallerPolicy, as_caller

    path, _ = stock["sd15"]
    file = tmp_path / "secret.png"
    random_image(64, 64).save(file)
    with as_caller(CallerPolicy(trusted=False, pinned=frozenset({path}))):
        with pytest.raises(errors.InvalidRequestError) as info:
            engine.generate(model=path, prompt=PROMPT, image=str(file), num_inference_steps=2)
    assert info.value.field == "image"


def test_img2img_step_callback_counts_the_strength_steps_and_can_cancel(engine, stock):
    path, _ = stock["sdxl"]
    seen = []
    kw = dict(model=path, prompt=PROMPT, image=random_image(64, 64), strength=0.5, num_inference_steps=6, seed=1)
    engine.generate(step_callback=lambda i, n, latents: seen.append((i, n, tuple(latents.shape))), **kw)
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3)]  # 6 steps at strength 0.5
    assert seen[0][2] == (1, 4, 8, 8)

    class Stop(Exception):
        pass

    def cancel(i, n, latents):
        raise Stop

    with pytest.raises(Stop):
        engine.generate(step_callback=cancel, **kw)


@pytest.mark.parametrize("plan", ["model_offload", "group_offload"])
def test_img2img_under_offloading_memory_plans(stock, plan):
    """The VAE encoder and the denoiser behind accelerate / group-offload hooks: the same image as resident."""
    from engine import Engine

    path, pipe = stock["sd15"]
    image = random_image(96, 64, seed=2)
    expected = stock_img2img(pipe, "sd15", image, 0.7, 2, seed=6)
    eng = Engine(device="cpu", memory_plan=plan)
    try:
        got = eng.generate(model=path, prompt=PROMPT, image=image, strength=0.7, num_inference_steps=4,
                           guidance_scale=5.0, num_images=2, seed=6)
        assert any(plan in line for line in eng.optimization_report(path).memory_plan)
    finally:
        eng.close()
    assert np.abs(arrays(expected) - arrays(got.images)).max() <= 1
