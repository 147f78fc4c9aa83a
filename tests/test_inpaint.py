"""Inpainting (`image` + `mask_image`) reproduces diffusers' inpaint pipelines on tiny models in fp32:
StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline / FluxInpaintPipeline with the ordinary denoiser,
and the inpainting-specific denoisers (a 9-channel SD UNet, a FLUX Fill transformer) through their classes, over
several strengths, a non-square size and batches."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from engine import errors
from stock_models import BUILDERS
from test_img2img import PROMPT, arrays, family_kwargs, random_image

INPAINT = {"sd15": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
           "flux": "FluxInpaintPipeline"}
CASES = [(64, 64, 0.6, 1), (96, 64, None, 2), (64, 112, 1.0, 1)]  # None: the class's default strength


def random_mask(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
    mask[y0 : y0 + height // 2, x0 : x0 + width // 2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    return {family: (str(path), builder(path)) for family, builder in BUILDERS.items()
            for path in [tmp_path_factory.mktemp(f"inpaint-{family}")]}


def run_stock(cls, pipe, family, image, mask, strength, n, seed, steps=4, **extra):
    stock = cls.from_pipe(pipe) if not isinstance(pipe, cls) else pipe
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=steps, guidance_scale=5.0,
                  num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed),
                  width=image.width, height=image.height, **family_kwargs(family), **extra)
    if strength is not None:
        kwargs["strength"] = strength
    return stock(**kwargs).images


def check_cases(engine, path, pipe, cls, family, cases):
    for i, (w, h, strength, n) in enumerate(cases):
        image, mask = random_image(w, h, seed=10 + i), random_mask(w, h, seed=i)
        expected = run_stock(cls, pipe, family, image, mask, strength, n, seed=3 + i)
        got = engine.generate(model=path, prompt=PROMPT, image=image, mask_image=mask, strength=strength,
                              num_inference_steps=4, guidance_scale=5.0, num_images=n, seed=3 + i,
                              **family_kwargs(family))
        assert [im.size for im in got.images] == [(w, h)] * n
        diff = np.abs(arrays(expected) - arrays(got.images)).max()
        assert diff <= 1, f"{cls.__name__} {w}x{h} strength={strength} n={n}: max difference {diff} levels"


@pytest.mark.parametrize("family", list(INPAINT))
def test_inpaint_matches_stock_diffusers(engine, stock, family):
    path, pipe = stock[family]
    check_cases(engine, path, pipe, getattr(diffusers, INPAINT[family]), family, CASES)


def test_inpaint_mask_matters(engine, stock):
    path, _ = stock["sd15"]
    image = random_image(64, 64, seed=1)
    kw = dict(model=path, prompt=PROMPT, image=image, num_inference_steps=3, seed=1)
    left, right = np.zeros((64, 64), dtype=np.uint8), np.zeros((64, 64), dtype=np.uint8)
    left[:, :32], right[:, 32:] = 255, 255  # masks that differ at the latent resolution (8x8 here)
    a = engine.generate(mask_image=Image.fromarray(left), **kw)
    b = engine.generate(mask_image=Image.fromarray(right), **kw)
    assert not np.array_equal(arrays(a.images), arrays(b.images))


def test_nine_channel_inpainting_unet(engine, tmp_path):
    """An inpainting checkpoint (UNet with 4 noise + 4 masked-image + 1 mask channels) runs through
    StableDiffusionInpaintPipeline; image-to-image without a mask is refused (it has no class for that)."""
    base = BUILDERS["sd15"](tmp_path / "base")
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    torch.manual_seed(5)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    pipe = diffusers.StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.save_pretrained(tmp_path / "inpaint")
    check_cases(engine, str(tmp_path / "inpaint"), pipe, diffusers.StableDiffusionInpaintPipeline, "sd15",
                [(64, 64, 1.0, 1), (96, 64, 0.7, 2)])
    with pytest.raises(errors.InvalidRequestError) as info:
        engine.generate(model=str(tmp_path / "inpaint"), prompt=PROMPT, image=random_image(64, 64),
                        num_inference_steps=2)
    assert info.value.field == "mask_image"


def test_flux_fill(engine, tmp_path):
    """A FLUX Fill transformer (noise + masked-image latents + packed mask as input channels) runs through
    FluxFillPipeline."""
    base = BUILDERS["flux"](tmp_path / "base")
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    packed = base.transformer.config.in_channels  # 4 latent channels x 2x2 packing
    config.update(in_channels=2 * packed + 4 * base.vae_scale_factor**2, out_channels=packed)
    torch.manual_seed(6)
    transformer = diffusers.FluxTransformer2DModel.from_config(config).eval()
    names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pipe = diffusers.FluxFillPipeline(**{k: base.components[k] for k in names}, transformer=transformer)
    pipe.save_pretrained(tmp_path / "fill")
    check_cases(engine, str(tmp_path / "fill"), pipe, diffusers.FluxFillPipeline, "flux",
                [(64, 64, None, 1), (96, 64, 0.8, 2)])
