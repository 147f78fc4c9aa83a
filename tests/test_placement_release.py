"""A dropped model leaves nothing behind: under a swap plan (accelerate hooks chained into groups) unloading,
evicting or falling back frees the model's modules, and a ControlNet cached by the engine (placed in the model's swap
group) does not keep them alive either. On the CPU the swap plans are forced with `memory_plan=`."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from engine import Engine
from engine.runtime import placement

ARGS = dict(prompt="a red bicycle", num_inference_steps=2, seed=3, width=64, height=64)


def _unet_ref(eng: Engine, model: str = "tiny-sdxl") -> weakref.ref:
    return weakref.ref(eng._slots[model].loaded.components["unet"])


def _gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("plan", ["model_offload", "text_encoders_offloaded"])
def test_unload_frees_a_swap_placed_model(plan):
    eng = Engine(device="cpu", memory_plan=plan)
    eng.generate(model="tiny-sdxl", **ARGS)
    ref = _unet_ref(eng)
    assert placement.swap_group(ref()) is not None
    assert eng.unload("tiny-sdxl")
    assert _gone(ref)


def test_eviction_frees_a_swap_placed_model():
    eng = Engine(device="cpu", memory_plan="model_offload", max_loaded_models=1)
    eng.generate(model="tiny-sdxl", **ARGS)
    ref = _unet_ref(eng)
    eng.load("tiny-sd15")
    assert eng.loaded_models() == ["tiny-sd15"]
    assert _gone(ref)


def test_cached_controlnet_does_not_keep_the_dropped_model(monkeypatch):
    import diffusers

    from engine.loading.tiny import ensure_tiny_model
    from test_controlnet import make_controlnet
    from test_img2img import random_image

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("sdxl"), torch_dtype=torch.float32)
    net = make_controlnet(pipe, "sdxl", seed=3)
    del pipe
    eng = Engine(device="cpu", memory_plan="model_offload")
    eng.controlnet_resolver = lambda model, **kw: net  # a cached (by id) ControlNet, as a loaded one is
    request = {**ARGS, "controlnets": [{"model": "cn-by-id", "image": random_image(64, 64, seed=2)}]}
    eng.generate(model="tiny-sdxl", **request)
    ref = _unet_ref(eng)
    assert net in placement.swap_group(ref())[0].adjuncts
    assert eng.unload("tiny-sdxl")
    assert _gone(ref)
    assert getattr(net, "_hf_hook", None) is None  # its hook chained to the dropped model's groups came off
    # the cached ControlNet serves the model loaded again, in the new groups
    eng.generate(model="tiny-sdxl", **request)
    assert net in placement.swap_group(eng._slots["tiny-sdxl"].loaded.components["unet"])[0].adjuncts
    eng.close()


def test_out_of_memory_fallback_reloads_with_the_failed_slot_freed(monkeypatch):
    eng = Engine(device="cpu", memory_plan="text_encoders_offloaded")
    eng.generate(model="tiny-sdxl", **ARGS)
    ref = _unet_ref(eng)
    alive_at_reload = []
    real_run, real_build = Engine._run, Engine._build

    def run(self, model, slot, *args, **kwargs):
        if not alive_at_reload:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real_run(self, model, slot, *args, **kwargs)

    def build(self, *args, **kwargs):
        alive_at_reload.append(not _gone(ref))
        return real_build(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run", run)
    monkeypatch.setattr(Engine, "_build", build)
    eng.generate(model="tiny-sdxl", **ARGS)
    assert alive_at_reload == [False]
    assert eng._slots["tiny-sdxl"].plan.rung != "text_encoders_offloaded"


def test_unload_removes_the_cfg_parallel_copy():
    """A slot with a CFG-parallel UNet copy (compiler pass parallel, two CPU "devices" here): unloading takes the
    hooks off and drops the copy with the slot."""
    eng = Engine(device="cpu", compile_config={"parallel_devices": ["cpu", "cpu"]})
    eng.generate(model="tiny-sdxl", **ARGS, guidance_scale=5.0)
    handle = eng._slots["tiny-sdxl"].cfg_parallel
    assert handle is not None and handle.replica is not None
    ref = _unet_ref(eng)
    assert eng.unload("tiny-sdxl")
    assert handle.replica is None
    del handle
    assert _gone(ref)
