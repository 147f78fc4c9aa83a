"""Scheduler presets reproduce stock diffusers configured with the same scheduler; family rules are enforced."""

import diffusers
import pytest
import torch

from conftest import images_close
from engine import errors
from engine.loading.tiny import ensure_tiny_model
from engine.schedulers import PRESETS, presets_for

STOCK = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
         "flux": diffusers.FluxPipeline}


@pytest.fixture(scope="module")
def stock_pipes():
    pipes = {}
    for family, cls in STOCK.items():
        pipe = cls.from_pretrained(ensure_tiny_model(family))
        pipe.set_progress_bar_config(disable=True)
        pipes[family] = pipe
    return pipes


def _stock(pipe, preset, family, steps, seed):
    base = pipe.scheduler
    pipe.scheduler = getattr(diffusers, preset.class_name).from_config(base.config, **preset.overrides)
    try:
        kwargs = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=steps, guidance_scale=5.0,
                      generator=torch.Generator("cpu").manual_seed(seed))
        if family == "flux":
            kwargs["max_sequence_length"] = 64
        return pipe(**kwargs).images
    finally:
        pipe.scheduler = base


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_stock(engine, stock_pipes, name):
    preset = PRESETS[name]
    for family in preset.families:
        steps = 4
        expected = _stock(stock_pipes[family], preset, family, steps, seed=21)
        extra = {"max_sequence_length": 64} if family == "flux" else {}
        got = engine.generate(model=f"tiny-{family}", prompt="a lighthouse", width=64, height=64,
                              num_inference_steps=steps, guidance_scale=5.0, seed=21, scheduler=name, **extra)
        ok, frac = images_close(expected, got.images)
        assert ok, f"{name} on {family}: {frac:.4%}"


def test_presets_change_the_result(engine):
    a = engine.generate(model="tiny-sdxl", prompt="x", width=64, height=64, num_inference_steps=4, seed=1,
                        scheduler="euler")
    b = engine.generate(model="tiny-sdxl", prompt="x", width=64, height=64, num_inference_steps=4, seed=1,
                        scheduler="dpmpp_2m_karras")
    assert not images_close(a.images, b.images, levels=0, fraction=1.0)[0]


def test_family_rules(engine):
    with pytest.raises(errors.InvalidRequestError) as info:
        engine.generate(model="tiny-flux", prompt="x", scheduler="lcm")
    assert info.value.field == "scheduler" and "flow_match_euler" in str(info.value)
    with pytest.raises(errors.InvalidRequestError, match="unknown scheduler"):
        engine.generate(model="tiny-sd15", prompt="x", scheduler="nope")
    with pytest.raises(errors.InvalidRequestError, match="does not fit sdxl"):
        engine.generate(model="tiny-sdxl", prompt="x", scheduler="flow_match_euler")
    assert "lcm" in presets_for("sdxl") and presets_for("flux") == ["flow_match_euler"]
    required = {"euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde", "lcm", "tcd",
                "euler_trailing", "dpm_singlestep_trailing", "flow_match_euler"}
    assert required <= set(PRESETS)
