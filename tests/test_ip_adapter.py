"""IP-Adapters (`ip_adapter={"model", "image", "scale"}`) reproduce diffusers' `load_ip_adapter` +
`set_ip_adapter_scale` + `ip_adapter_image=` on the tiny SD 1.5 and SDXL models in fp32; the adapter is loaded for
its job only (a plain request afterwards is the plain image again); bad inputs are 422s naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import images_close
from engine import Engine
from engine.errors import InvalidRequestError
from engine.families import get_family
from engine.loading import CallerPolicy, as_caller, load_model
from engine.loading.ip_adapter import resolve_ip_adapter
from engine.loading.stock import build_stock_pipeline
from engine.loading.tiny import ensure_tiny_model
from test_img2img import PROMPT, arrays, random_image

MODELS = {"sd15": ("tiny-sd15", "tiny-ip-adapter-sd15"), "sdxl": ("tiny-sdxl", "tiny-ip-adapter-sdxl")}
STEPS = 3


@pytest.fixture(scope="module")
def stock():
    """A stock diffusers pipeline per family over its own copy of the tiny weights, with the adapter loaded."""
    built = {}
    for family, (model, adapter) in MODELS.items():
        loaded = load_model(model)
        pipe = build_stock_pipeline(family, loaded.components, get_family(family).stock_pipeline)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(**resolve_ip_adapter(adapter, family=family).load_kwargs())
        built[family] = pipe
    return built


def run_stock(pipe, image, scale, w, h, n, seed):
    pipe.set_ip_adapter_scale(scale)
    return pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, width=w, height=h,
                num_images_per_prompt=n, ip_adapter_image=image,
                generator=torch.Generator("cpu").manual_seed(seed)).images


def run_engine(engine, family, image, scale, w, h, n, seed, **extra):
    model, adapter = MODELS[family]
    return engine.generate(model=model, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, width=w,
                           height=h, num_images=n, seed=seed,
                           ip_adapter={"model": adapter, "image": image, "scale": scale}, **extra).images


CASES = [(64, 64, 1, 1.0), (64, 96, 2, 0.5)]  # (width, height, num_images, scale): a non-square size, a batch


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("w,h,n,scale", CASES)
def test_ip_adapter_matches_stock_diffusers(engine, stock, family, w, h, n, scale):
    image = random_image(80, 72, seed=3)
    ours = run_engine(engine, family, image, scale, w, h, n, seed=5)
    theirs = run_stock(stock[family], image, scale, w, h, n, seed=5)
    assert len(ours) == n and ours[0].size == (w, h)
    ok, frac = images_close(arrays(ours), arrays(theirs))
    assert ok, frac
    other = run_engine(engine, family, random_image(80, 72, seed=4), scale, w, h, n, seed=5)
    assert np.abs(arrays(ours) - arrays(other)).max() > 0  # the image prompt reaches the denoiser


@pytest.mark.parametrize("family", list(MODELS))
def test_plain_request_after_ip_adapter_is_the_plain_image(engine, family):
    model, _ = MODELS[family]
    kwargs = dict(model=model, prompt=PROMPT, num_inference_steps=STEPS, width=64, height=64, seed=9)
    before = engine.generate(**kwargs).images
    with_adapter = run_engine(engine, family, random_image(64, 64, seed=1), 1.0, 64, 64, 1, seed=9)
    after = engine.generate(**kwargs).images
    assert np.array_equal(arrays(before), arrays(after))
    assert np.abs(arrays(before) - arrays(with_adapter)).max() > 0
    unet = engine._slot(model).loaded.components["unet"]
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None


def test_ip_adapter_of_another_family_is_a_422(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(model="tiny-sd15", prompt=PROMPT, num_inference_steps=2, width=64, height=64,
                        ip_adapter={"model": "tiny-ip-adapter-sdxl", "image": random_image(64, 64)})
    assert err.value.field == "ip_adapter.model" and "sdxl" in str(err.value)


def test_corrupt_ip_adapter_image_is_a_422(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(model="tiny-sd15", prompt=PROMPT, num_inference_steps=2, width=64, height=64,
                        ip_adapter={"model": "tiny-ip-adapter-sd15", "image": "data:image/png;base64,AAAA"})
    assert err.value.field == "ip_adapter.image"


def test_ip_adapter_scale_out_of_range_is_a_422(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(model="tiny-sd15", prompt=PROMPT, ip_adapter={"model": "tiny-ip-adapter-sd15",
                                                                      "image": random_image(64, 64), "scale": 9})
    assert err.value.field == "ip_adapter.scale"


def test_untrusted_caller_cannot_name_a_local_ip_adapter(engine):
    folder = ensure_tiny_model("ip-adapter-sd15")
    weights = next(folder.glob("*/*.safetensors"))
    with as_caller(CallerPolicy(trusted=False)):
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(model="tiny-sd15", prompt=PROMPT, num_inference_steps=2, width=64, height=64,
                            ip_adapter={"model": str(weights), "image": random_image(64, 64)})
    assert err.value.field == "ip_adapter.model"
    # a trusted caller may name the same file
    out = engine.generate(model="tiny-sd15", prompt=PROMPT, num_inference_steps=2, width=64, height=64, seed=1,
                          ip_adapter={"model": str(weights), "image": random_image(64, 64)})
    assert out.images[0].size == (64, 64)


def test_flux_ip_adapter_is_refused_with_a_reason(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(model="tiny-flux", prompt=PROMPT, num_inference_steps=2, width=64, height=64,
                        ip_adapter={"model": "tiny-ip-adapter-sd15", "image": random_image(64, 64)})
    assert err.value.field == "ip_adapter" and "flux" in str(err.value)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_ip_adapter_at_opt_levels_matches_stock_or_reports(stock, level):
    """Lossless passes (fused QKV, attention backend, compile where CPU allows) keep the stock image; a plain
    request after the adapter is the plain image again."""
    eng = Engine(device="cpu", opt_level=level, compile_config={"dtype": "fp32"})
    image = random_image(64, 64, seed=2)
    kwargs = dict(model="tiny-sd15", prompt=PROMPT, num_inference_steps=STEPS, width=64, height=64, seed=3,
                  guidance_scale=5.0)
    before = eng.generate(**kwargs).images
    ours = run_engine(eng, "sd15", image, 1.0, 64, 64, 1, seed=3)
    theirs = run_stock(stock["sd15"], image, 1.0, 64, 64, 1, seed=3)
    ok, frac = images_close(arrays(ours), arrays(theirs), levels=2)
    assert ok, (frac, eng.optimization_report("tiny-sd15"))
    after = eng.generate(**kwargs).images
    assert images_close(arrays(before), arrays(after), levels=0)[0]
    stats = eng.compile_stats("tiny-sd15")
    if stats is not None:  # compiled (O2): the adapter's processors compile once; later jobs reuse the graphs
        graphs = stats["graphs"]
        run_engine(eng, "sd15", image, 0.5, 64, 64, 1, seed=3)
        eng.generate(**kwargs)
        assert eng.compile_stats("tiny-sd15")["graphs"] == graphs
    eng.close()


def test_ip_adapter_under_model_offload(stock):
    eng = Engine(device="cpu", memory_plan="model_offload")
    image = random_image(64, 64, seed=6)
    ours = run_engine(eng, "sd15", image, 1.0, 64, 64, 1, seed=4)
    theirs = run_stock(stock["sd15"], image, 1.0, 64, 64, 1, seed=4)
    assert images_close(arrays(ours), arrays(theirs))[0]
    eng.close()


def test_ip_adapter_with_a_lora_matches_stock_diffusers(engine, tmp_path):
    """peft LoRA layers on to_k/to_v and the IP-Adapter processors compose as in diffusers (LoRA loaded first)."""
    from test_lora import make_lora

    lora = make_lora(tmp_path / "sd15.safetensors", 3, family="sd15")
    loaded = load_model("tiny-sd15")
    pipe = build_stock_pipeline("sd15", loaded.components, "StableDiffusionPipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    pipe.load_ip_adapter(**resolve_ip_adapter("tiny-ip-adapter-sd15", family="sd15").load_kwargs())
    image = random_image(64, 64, seed=8)
    theirs = run_stock(pipe, image, 0.8, 64, 64, 1, seed=2)
    ours = run_engine(engine, "sd15", image, 0.8, 64, 64, 1, seed=2, loras=[{"path": str(lora)}])
    assert images_close(arrays(ours), arrays(theirs))[0]
    engine.unload_loras("tiny-sd15")


def test_ip_adapter_on_an_exported_denoiser_is_a_422():
    eng = Engine(device="cpu", compile_config={"backend": "onnxruntime"})
    with pytest.raises(InvalidRequestError) as err:
        run_engine(eng, "sd15", random_image(64, 64), 1.0, 64, 64, 1, seed=1)
    assert err.value.field == "ip_adapter" and "exported" in str(err.value)
    eng.close()


def test_ip_adapter_on_quantized_weights(stock):
    """The quant pass (O3 on a GPU; forced here) stores the UNet's linear weights as torchao int8. With fused q/k/v
    an IP-Adapter request is a 422 naming the setting, raised before anything moves (the next plain request is the
    image it was); with fuse_qkv off the adapter loads for its job beside the quantized projections, near stock."""
    from engine.bench.quality import psnr

    pytest.importorskip("torchao")
    image = random_image(64, 64, seed=2)
    kwargs = dict(model="tiny-sd15", prompt=PROMPT, num_inference_steps=STEPS, width=64, height=64, seed=3,
                  guidance_scale=5.0)
    theirs = run_stock(stock["sd15"], image, 1.0, 64, 64, 1, seed=3)
    fused = Engine(device="cpu", opt_level="O1", compile_config={"dtype": "fp32", "quant": "int8_weight_only"})
    try:
        before = fused.generate(**kwargs).images
        assert fused.optimization_report("tiny-sd15").status("fuse_qkv") == "applied"
        with pytest.raises(InvalidRequestError) as err:
            run_engine(fused, "sd15", image, 1.0, 64, 64, 1, seed=3)
        assert err.value.field == "ip_adapter" and "fuse_qkv" in str(err.value) and "stored quantized" in str(err.value)
        assert images_close(arrays(before), arrays(fused.generate(**kwargs).images), levels=0)[0]
    finally:
        fused.close()
    separate = Engine(device="cpu", opt_level="O1",
                      compile_config={"dtype": "fp32", "quant": "int8_weight_only", "fuse_qkv": False})
    try:
        plain = separate.generate(**kwargs).images
        ours = run_engine(separate, "sd15", image, 1.0, 64, 64, 1, seed=3)
        assert psnr(ours, theirs) > 30 and psnr(ours, theirs) > psnr(plain, theirs) + 10
        assert images_close(arrays(plain), arrays(separate.generate(**kwargs).images), levels=0)[0]
    finally:
        separate.close()
