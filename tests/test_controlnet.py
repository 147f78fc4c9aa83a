"""ControlNets (`controlnets=[{"model", "image", "conditioning_scale", "start", "end"}]`) reproduce diffusers'
ControlNet pipelines on tiny models in fp32 (StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
FluxControlNetPipeline, several ControlNets as diffusers' MultiControlNet, and with image-to-image), and are refused
with a 422 naming the field where they cannot run (another family, an exported denoiser)."""

import inspect

import diffusers
import numpy as np
import pytest
import torch

from conftest import images_close
from engine import Engine, errors
from stock_models import BUILDERS
from test_img2img import PROMPT, arrays, family_kwargs, random_image

CONTROLNET = {"sd15": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline",
              "flux": "FluxControlNetPipeline"}
CONTROLNET_IMG2IMG = {"sd15": "StableDiffusionControlNetImg2ImgPipeline",
                      "sdxl": "StableDiffusionXLControlNetImg2ImgPipeline", "flux": "FluxControlNetImg2ImgPipeline"}


def make_controlnet(pipe, family: str, seed: int):
    """A ControlNet built from the tiny denoiser as diffusers does (`from_unet` / `from_transformer`), with its
    zero-initialised output layers randomised so it changes the image."""
    torch.manual_seed(seed)
    if family == "flux":
        net = diffusers.FluxControlNetModel.from_transformer(
            pipe.transformer, num_layers=1, num_single_layers=1,
            attention_head_dim=pipe.transformer.config.attention_head_dim,
            num_attention_heads=pipe.transformer.config.num_attention_heads)
        zeroed = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")
    else:
        net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        zeroed = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(zeroed):
                p.copy_(torch.randn(p.shape) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    built = {}
    for family, builder in BUILDERS.items():
        path = tmp_path_factory.mktemp(f"controlnet-{family}")
        pipe = builder(path)
        built[family] = (str(path), pipe, [make_controlnet(pipe, family, seed) for seed in (1, 2)])
    return built


def run_stock(cls_name, pipe, family, nets, controls, w, h, n, seed, image=None, strength=None):
    cls = getattr(diffusers, cls_name)
    takes = inspect.signature(cls.__init__).parameters
    stock = cls(**{k: v for k, v in pipe.components.items() if k in takes},
                controlnet=nets[0] if len(nets) == 1 else nets)
    stock.set_progress_bar_config(disable=True)
    one = len(controls) == 1
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=n, width=w,
                  height=h, generator=torch.Generator("cpu").manual_seed(seed), **family_kwargs(family))
    images = [c["image"] for c in controls]
    for arg, key in (("controlnet_conditioning_scale", "conditioning_scale"), ("control_guidance_start", "start"),
                     ("control_guidance_end", "end")):
        values = [c.get(key, {"conditioning_scale": 1.0, "start": 0.0, "end": 1.0}[key]) for c in controls]
        kwargs[arg] = values[0] if one else values
    if image is not None:
        kwargs.update(image=image, control_image=images[0] if one else images)
        if strength is not None:
            kwargs["strength"] = strength
    elif family == "flux":
        kwargs["control_image"] = images[0] if one else images
    else:
        kwargs["image"] = images[0] if one else images
    return stock(**kwargs).images


CASES = [  # (width, height, num_images, controls as (net index, scale, start, end))
    (64, 64, 1, [(0, 1.0, 0.0, 1.0)]),
    (96, 64, 2, [(0, 0.7, 0.0, 0.5)]),
    (64, 96, 1, [(0, 0.8, 0.0, 1.0), (1, 0.5, 0.25, 1.0)]),  # several: MultiControlNet
]


@pytest.mark.parametrize("family", list(CONTROLNET))
def test_controlnet_matches_stock_diffusers(engine, stock, family):
    path, pipe, nets = stock[family]
    for i, (w, h, n, spec) in enumerate(CASES):
        controls = [{"model": nets[k], "image": random_image(w, h, seed=20 + k), "conditioning_scale": s,
                     "start": a, "end": b} for k, s, a, b in spec]
        expected = run_stock(CONTROLNET[family], pipe, family, [nets[k] for k, *_ in spec], controls, w, h, n, 9 + i)
        got = engine.generate(model=path, prompt=PROMPT, controlnets=controls, width=w, height=h, num_images=n,
                              num_inference_steps=4, guidance_scale=5.0, seed=9 + i, **family_kwargs(family))
        diff = np.abs(arrays(expected) - arrays(got.images)).max()
        assert diff <= 1, f"{family} {w}x{h} n={n} {spec}: max difference {diff} levels"
        plain = engine.generate(model=path, prompt=PROMPT, width=w, height=h, num_images=n, num_inference_steps=4,
                                guidance_scale=5.0, seed=9 + i, **family_kwargs(family))
        assert not images_close(plain.images, got.images)[0]  # the ControlNet acts


@pytest.mark.parametrize("family", list(CONTROLNET_IMG2IMG))
def test_controlnet_with_img2img_matches_stock(engine, stock, family):
    path, pipe, nets = stock[family]
    image, control = random_image(96, 64, seed=3), random_image(96, 64, seed=4)
    controls = [{"model": nets[0], "image": control, "conditioning_scale": 0.9}]
    expected = run_stock(CONTROLNET_IMG2IMG[family], pipe, family, nets[:1], controls, 96, 64, 2, 5, image=image,
                         strength=0.75)
    got = engine.generate(model=path, prompt=PROMPT, image=image, strength=0.75, controlnets=controls, num_images=2,
                          num_inference_steps=4, guidance_scale=5.0, seed=5, **family_kwargs(family))
    assert got.images[0].size == (96, 64)
    assert np.abs(arrays(expected) - arrays(got.images)).max() <= 1


def test_output_size_follows_the_control_image(engine, stock):
    path, _, nets = stock["sd15"]
    got = engine.generate(model=path, prompt=PROMPT, num_inference_steps=2, seed=1,
                          controlnets=[{"model": nets[0], "image": random_image(100, 72)}])
    assert got.images[0].size == (96, 72)


def test_controlnet_refusals_name_the_field(engine, stock):
    path, _, _ = stock["sd15"]
    _, _, sdxl_nets = stock["sdxl"]
    _, _, flux_nets = stock["flux"]
    image = random_image(64, 64)
    for nets, why in ((sdxl_nets, "another base model"), (flux_nets, "FluxControlNetModel")):
        with pytest.raises(errors.InvalidRequestError, match=why) as info:
            engine.generate(model=path, prompt=PROMPT, num_inference_steps=2,
                            controlnets=[{"model": nets[0], "image": image}])
        assert info.value.field == "controlnets[0].model"
    with pytest.raises(errors.InvalidRequestError) as info:
        engine.generate(model=path, prompt=PROMPT, num_inference_steps=2,
                        controlnets=[{"model": sdxl_nets[0], "image": image, "start": 0.6, "end": 0.4}])
    assert info.value.field.startswith("controlnets")
    with pytest.raises(errors.InvalidRequestError) as info:
        engine.generate(model=path, prompt=PROMPT, num_inference_steps=2,
                        controlnets=[{"model": sdxl_nets[0], "image": b"garbage"}])
    assert info.value.field == "controlnets[0].image"


def test_controlnet_ids_go_through_the_resolver(stock):
    """String ids are resolved for the model's family, in the denoiser's dtype and device (injectable resolver);
    the resolved module is cached per engine."""
    path, pipe, nets = stock["sd15"]
    calls = []

    def resolver(source, *, family, torch_dtype, device):
        calls.append((source, family, torch_dtype, str(device)))
        return nets[0]

    eng = Engine(device="cpu")
    eng.controlnet_resolver = resolver
    try:
        control = random_image(64, 64, seed=2)
        by_id = eng.generate(model=path, prompt=PROMPT, num_inference_steps=2, seed=3,
                             controlnets=[{"model": "tiny-controlnet-sd15", "image": control}])
        eng.generate(model=path, prompt=PROMPT, num_inference_steps=2, seed=3,
                     controlnets=[{"model": "tiny-controlnet-sd15", "image": control}])
        by_module = eng.generate(model=path, prompt=PROMPT, num_inference_steps=2, seed=3,
                                 controlnets=[{"model": nets[0], "image": control}])
    finally:
        eng.close()
    assert calls == [("tiny-controlnet-sd15", "sd15", torch.float32, "cpu")]
    assert np.array_equal(arrays(by_id.images), arrays(by_module.images))
