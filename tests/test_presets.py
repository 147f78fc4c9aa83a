"""Distilled presets: a base model plus a replacement UNet or a fused LoRA load as one id with their own defaults."""

import shutil

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from conftest import images_close
from engine import Engine, errors
from engine.loading.tiny import ensure_tiny_model
from engine.paths import configs_dir
from engine.registry import registry
from test_lora import make_lora


@pytest.fixture()
def preset_configs(tmp_path, monkeypatch):
    """A copy of configs/ with two offline presets on tiny-sdxl: a replacement UNet, and a fused LoRA."""
    folder = ensure_tiny_model("sdxl")  # built from the real configs before the switch
    configs = tmp_path / "configs"
    shutil.copytree(configs_dir(), configs)
    torch.manual_seed(5)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet_file = tmp_path / "distilled_unet.safetensors"
    save_file(unet.state_dict(), unet_file)
    lora_file = make_lora(tmp_path / "lcm_lora.safetensors", 6)
    with open(configs / "models.yaml", "a") as f:
        f.write(f"""
tiny-lightning:
  family: sdxl
  source: test
  base: tiny-sdxl
  unet: {unet_file}
  defaults: {{steps: 2, guidance_scale: 0.0, width: 64, height: 64, scheduler: euler_trailing}}
tiny-lcm:
  family: sdxl
  source: test
  base: tiny-sdxl
  lora: {lora_file}
  lora_scale: 0.8
  defaults: {{steps: 3, guidance_scale: 1.0, width: 64, height: 64, scheduler: lcm}}
""")
    monkeypatch.setenv("ENGINE_CONFIGS_DIR", str(configs))
    assert "tiny-lightning" in registry()
    return {"folder": folder, "unet": unet, "lora": lora_file}


def _stock(folder, scheduler_cls, overrides, steps, guidance, unet=None, lora=None, lora_scale=1.0):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if unet is not None:
        pipe.unet.load_state_dict(unet.state_dict())
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    return pipe(prompt="a cat", width=64, height=64, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(2)).images


def test_unet_preset_uses_its_weights_and_defaults(preset_configs):
    eng = Engine(device="cpu")
    res = eng.generate(model="tiny-lightning", prompt="a cat", seed=2)
    assert (res.num_inference_steps, res.guidance_scale) == (2, 0.0)
    expected = _stock(preset_configs["folder"], diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"},
                      2, 0.0, unet=preset_configs["unet"])
    assert images_close(expected, res.images)[0]
    base = eng.generate(model="tiny-sdxl", prompt="a cat", seed=2, width=64, height=64, num_inference_steps=2,
                        guidance_scale=0.0, scheduler="euler_trailing")
    assert not images_close(base.images, res.images)[0]
    assert "unet" in eng.load("tiny-lightning").source


def test_lora_preset_is_fused_into_the_base(preset_configs):
    res = Engine(device="cpu").generate(model="tiny-lcm", prompt="a cat", seed=2)
    expected = _stock(preset_configs["folder"], diffusers.LCMScheduler, {}, 3, 1.0, lora=preset_configs["lora"],
                      lora_scale=0.8)
    assert images_close(expected, res.images)[0]


def test_preset_overrides_and_missing_files(preset_configs, tmp_path):
    eng = Engine(device="cpu")
    res = eng.generate(model="tiny-lightning", prompt="a cat", seed=2, num_inference_steps=3, scheduler="euler")
    assert res.num_inference_steps == 3
    rows = {r["id"]: r for r in Engine.models()}
    assert rows["tiny-lightning"]["offline"] is True
    assert rows["sdxl-lightning"]["offline"] is False
    with pytest.raises(errors.HubUnavailableError, match="sdxl_lightning_4step_unet"):
        from engine.loading.hub_files import fetch_file

        fetch_file("ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors")
