"""Two places where the engine left stock diffusers' behaviour, each checked against stock diffusers (fp32):

- guidance-distilled (LCM) UNets (`time_cond_proj_dim` set) take the guidance scale as an embedding and run no
  classifier-free guidance (diffusers' `do_classifier_free_guidance`), at one image and at several;
- SDXL encodes an empty negative prompt `""`, and zeroes the negative branch only for `None`
  (`force_zeros_for_empty_prompt`); fal's schemas default `negative_prompt` to `""`, so fal-style calls encode it.
"""

import base64
import io
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import images_close
from stock_models import build_sd15, build_sdxl

TIME_COND_PROJ_DIM = 32
PROMPT = "a lighthouse at dusk"


def _with_lcm_unet(pipe, path: Path, seed: int, lcm_scheduler: bool):
    """The tiny stock pipeline with its UNet rebuilt from the same config plus `time_cond_proj_dim`, saved again."""
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # no `_use_default_values`
    config["time_cond_proj_dim"] = TIME_COND_PROJ_DIM
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    components = dict(pipe.components, unet=unet)
    if lcm_scheduler:
        components["scheduler"] = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe = type(pipe)(**components)
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == TIME_COND_PROJ_DIM and not any(
        torch.equal(p, torch.zeros_like(p)) for p in pipe.unet.time_embedding.cond_proj.parameters())
    return pipe


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    built = {}
    for family, builder, lcm_scheduler in (("sd15", build_sd15, False), ("sdxl", build_sdxl, False),
                                           ("sd15-lcm-scheduler", build_sd15, True),
                                           ("sdxl-lcm-scheduler", build_sdxl, True)):
        path = tmp_path_factory.mktemp(f"lcm-{family}")
        stock = builder(tmp_path_factory.mktemp(f"base-{family}"))
        built[family] = (str(path), _with_lcm_unet(stock, path, seed=21, lcm_scheduler=lcm_scheduler))
    return built


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("stock-sdxl")
    pipe = build_sdxl(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    return str(path), pipe


def _stock(pipe, *, neg, g, steps, n, seed, w=64, h=64):
    return pipe(prompt=PROMPT, negative_prompt=neg, width=w, height=h, num_inference_steps=steps, guidance_scale=g,
                num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed)).images


def _engine(engine, path, *, neg, g, steps, n, seed, w=64, h=64):
    return engine.generate(model=path, prompt=PROMPT, negative_prompt=neg, width=w, height=h,
                           num_inference_steps=steps, guidance_scale=g, num_images=n, seed=seed).images


# -- LCM (guidance-distilled) UNets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd15-lcm-scheduler", "sdxl-lcm-scheduler"])
@pytest.mark.parametrize("n", [1, 2])
def test_lcm_unet_runs_no_cfg_like_diffusers(engine, lcm, family, n):
    path, pipe = lcm[family]
    neg = "blurry" if n == 2 else None  # a negative prompt is ignored without CFG, in both
    expected = _stock(pipe, neg=neg, g=8.0, steps=2, n=n, seed=7, w=64, h=96)
    assert pipe.do_classifier_free_guidance is False  # the stock run above had no negative branch
    got = _engine(engine, path, neg=neg, g=8.0, steps=2, n=n, seed=7, w=64, h=96)
    assert [im.size for im in got] == [(64, 96)] * n
    ok, frac = images_close(expected, got)
    assert ok, f"{family} n={n}: only {frac:.4%} within 1 level"


def test_lcm_guidance_scale_still_conditions_the_unet(engine, lcm):
    """Without CFG the scale reaches the UNet as `timestep_cond`: a different scale is a different image, and the
    comparison above could tell them apart."""
    path, pipe = lcm["sdxl"]
    at_8 = _engine(engine, path, neg=None, g=8.0, steps=2, n=1, seed=7)
    at_2 = _engine(engine, path, neg=None, g=2.0, steps=2, n=1, seed=7)
    assert not images_close(at_8, at_2)[0]
    assert images_close(_stock(pipe, neg=None, g=2.0, steps=2, n=1, seed=7), at_2)[0]


# -- SDXL: "" is a prompt, None zeroes the negative branch ----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_sdxl_empty_negative_prompt_is_encoded_like_diffusers(engine, sdxl, n):
    path, pipe = sdxl
    expected_empty = _stock(pipe, neg="", g=5.0, steps=2, n=n, seed=3)
    expected_none = _stock(pipe, neg=None, g=5.0, steps=2, n=n, seed=3)
    assert not images_close(expected_empty, expected_none)[0]  # diffusers itself tells "" from None
    got_empty = _engine(engine, path, neg="", g=5.0, steps=2, n=n, seed=3)
    got_none = _engine(engine, path, neg=None, g=5.0, steps=2, n=n, seed=3)
    ok, frac = images_close(expected_empty, got_empty)
    assert ok, f'negative_prompt="": only {frac:.4%} within 1 level'
    ok, frac = images_close(expected_none, got_none)
    assert ok, f"negative_prompt=None: only {frac:.4%} within 1 level"


def _fal_images(out: dict) -> list[Image.Image]:
    images = []
    for obj in out["images"]:
        assert obj["url"].startswith("data:image/png;base64,")
        images.append(Image.open(io.BytesIO(base64.b64decode(obj["url"].split(",", 1)[1]))).convert("RGB"))
    return images


def test_fal_fast_sdxl_default_negative_prompt_is_empty_string(engine, sdxl, tmp_path):
    """fal-ai/fast-sdxl's `negative_prompt` defaults to "": the fal-style call equals diffusers with "", given or
    left to the default, and not diffusers with None."""
    from engine.runtime.files import FileStore
    from engine.service import FalService

    path, pipe = sdxl
    fal = FalService(engine, endpoint_overrides={"fal-ai/fast-sdxl": path}, files=FileStore(tmp_path / "files"))
    args = {"prompt": PROMPT, "seed": 3, "num_images": 2, "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2, "guidance_scale": 5.0, "format": "png", "sync_mode": True}
    by_default = _fal_images(fal.run("fal-ai/fast-sdxl", args))
    given = _fal_images(fal.run("fal-ai/fast-sdxl", {**args, "negative_prompt": ""}))
    expected_empty = _stock(pipe, neg="", g=5.0, steps=2, n=2, seed=3)
    expected_none = _stock(pipe, neg=None, g=5.0, steps=2, n=2, seed=3)
    for got in (by_default, given):
        ok, frac = images_close(expected_empty, got)
        assert ok, f"only {frac:.4%} within 1 level"
        assert not images_close(expected_none, got)[0]
    assert np.array_equal(np.stack([np.asarray(i) for i in by_default]), np.stack([np.asarray(i) for i in given]))
