"""Tiny ControlNets, inpainting/fill models and IP-Adapters: each builds offline, loads through the engine's loaders,
and runs for 2 steps in the stock diffusers pipeline of its kind; the loaders refuse what the caller may not use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InvalidRequestError, RefusedSourceError
from engine.families import get_family, variant_of_pipeline_class
from engine.loading import CallerPolicy, as_caller, load_model
from engine.loading.controlnet import check_controlnet_fits, clear_controlnet_cache, load_controlnet
from engine.loading.ip_adapter import check_ip_adapter_fits, resolve_ip_adapter
from engine.loading.stock import build_stock_pipeline
from engine.loading.tiny import ensure_tiny_model, tiny_kind
from engine.registry import adjuncts, find_adjunct, find_spec, get_spec, registry

UNTRUSTED = CallerPolicy(trusted=False)
SIZE = 64


def _image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size: int = SIZE) -> Image.Image:
    m = np.zeros((size, size), dtype=np.uint8)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(m)


def _stock(model: str, pipeline_class: str, **extra):
    loaded = load_model(model)
    pipe = build_stock_pipeline(loaded.family.name, {**loaded.components, **extra}, pipeline_class)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    out = pipe(prompt="a red fox", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    image = out.images[0]
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()
    return image


# ------------------------------------------------------------------------------------------------------ registry


def test_adjuncts_are_registered_apart_from_models():
    models = registry()
    for kind, ids in {"controlnet": ["tiny-controlnet-sd15", "tiny-controlnet-sdxl", "tiny-controlnet-flux",
                                     "controlnet-canny-sdxl", "controlnet-tile-sd15", "controlnet-canny-flux"],
                      "ip_adapter": ["tiny-ip-adapter-sd15", "tiny-ip-adapter-sdxl", "ip-adapter-sd15"]}.items():
        for adjunct_id in ids:
            spec = find_adjunct(kind, adjunct_id)
            assert spec is not None and spec.kind == kind and adjunct_id not in models
            assert find_spec(adjunct_id) is None  # never loaded as a model, never listed by `engine models`
    for model_id in ("tiny-sd15-inpainting", "tiny-sdxl-inpainting", "tiny-flux-fill", "flux-fill", "sdxl-inpainting"):
        spec = get_spec(model_id)
        assert spec.kind == "model" and spec.variant == "inpaint"


def test_tiny_adjunct_configs_agree_with_the_registry():
    """A tiny entry's registry layout (family, subfolder, weight name) is the one its config builds."""
    from engine.loading.tiny import _read

    for kind in ("controlnet", "ip_adapter"):
        for spec in adjuncts(kind).values():
            if not spec.is_tiny:
                continue
            cfg = _read(spec.tiny_config or "")[0]
            assert tiny_kind(spec.tiny_config or "") == kind and cfg["family"] == spec.family
            if kind == "ip_adapter":
                assert (cfg["subfolder"], cfg["weight_name"]) == (spec.subfolder, spec.weight_name)


def test_inpainting_folders_name_their_variant_pipeline():
    for model_id, channels in (("tiny-sd15-inpainting", 9), ("tiny-sdxl-inpainting", 9), ("tiny-flux-fill", 288)):
        spec = get_spec(model_id)
        folder = ensure_tiny_model(spec.tiny_config or "")
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        assert class_name == spec.family_spec.variant_pipeline("inpaint")
        assert variant_of_pipeline_class(class_name) == "inpaint"
        loaded = load_model(model_id)
        assert loaded.family.name == spec.family
        assert loaded.components[loaded.family.denoiser].config.in_channels == channels
    assert variant_of_pipeline_class("StableDiffusionPipeline") == ""


# ----------------------------------------------------------------------------------------- stock pipelines run


@pytest.mark.parametrize("model,controlnet,pipeline_class", [
    ("tiny-sd15", "tiny-controlnet-sd15", "StableDiffusionControlNetPipeline"),
    ("tiny-sdxl", "tiny-controlnet-sdxl", "StableDiffusionXLControlNetPipeline"),
    ("tiny-flux", "tiny-controlnet-flux", "FluxControlNetPipeline"),
])
def test_tiny_controlnet_runs_in_stock_pipeline(model, controlnet, pipeline_class):
    family = get_spec(model).family
    net = load_controlnet(controlnet, family=family)
    assert type(net).__name__ == get_family(family).controlnet_class
    pipe = _stock(model, pipeline_class, controlnet=net)
    check_controlnet_fits(net, getattr(pipe, get_family(family).denoiser), family)
    control = _image(1)
    on = _run(pipe, control_image=control, controlnet_conditioning_scale=1.0) if family == "flux" else \
        _run(pipe, image=control, controlnet_conditioning_scale=1.0)
    off = _run(pipe, control_image=control, controlnet_conditioning_scale=0.0) if family == "flux" else \
        _run(pipe, image=control, controlnet_conditioning_scale=0.0)
    assert np.abs(on - off).max() > 1e-4  # the ControlNet's residuals reach the denoiser


@pytest.mark.parametrize("model,pipeline_class", [
    ("tiny-sd15-inpainting", "StableDiffusionInpaintPipeline"),
    ("tiny-sdxl-inpainting", "StableDiffusionXLInpaintPipeline"),
    ("tiny-flux-fill", "FluxFillPipeline"),
])
def test_tiny_inpainting_model_runs_in_stock_pipeline(model, pipeline_class):
    assert get_spec(model).family_spec.variant_pipeline("inpaint") == pipeline_class
    pipe = _stock(model, pipeline_class)
    extra = {"strength": 1.0} if pipeline_class != "FluxFillPipeline" else {}
    a = _run(pipe, image=_image(2), mask_image=_mask(), **extra)
    b = _run(pipe, image=_image(3), mask_image=_mask(), **extra)
    assert np.abs(a - b).max() > 1e-4  # the masked image reaches the denoiser through its extra channels


@pytest.mark.parametrize("model,adapter", [("tiny-sd15", "tiny-ip-adapter-sd15"),
                                           ("tiny-sdxl", "tiny-ip-adapter-sdxl")])
def test_tiny_ip_adapter_loads_with_load_ip_adapter_and_runs(model, adapter):
    family = get_spec(model).family
    source = resolve_ip_adapter(adapter, family=family)
    pipe = _stock(model, get_family(family).stock_pipeline)
    check_ip_adapter_fits(source, pipe.unet)
    source.load_into(pipe)
    assert pipe.image_encoder is not None and pipe.image_encoder.config.projection_dim == source.image_embed_dim
    pipe.set_ip_adapter_scale(1.0)
    on = _run(pipe, ip_adapter_image=_image(4))
    pipe.set_ip_adapter_scale(0.0)
    off = _run(pipe, ip_adapter_image=_image(4))
    assert np.abs(on - off).max() > 1e-4  # the image tokens reach the cross-attention


# ------------------------------------------------------------------------------------------- loader policy


def test_load_controlnet_refuses_another_family():
    with pytest.raises(InvalidRequestError) as err:
        load_controlnet("tiny-controlnet-sdxl", family="sd15", field="controlnets[1].model")
    assert err.value.field == "controlnets[1].model" and "sdxl" in str(err.value)
    folder = ensure_tiny_model("controlnet-flux")  # a folder is checked by its config, not its name
    with pytest.raises(InvalidRequestError) as err:
        load_controlnet(str(folder), family="sdxl")
    assert err.value.field == "controlnets[0].model" and "flux" in str(err.value)
    sdxl_folder = ensure_tiny_model("controlnet-sdxl")
    with pytest.raises(InvalidRequestError):
        load_controlnet(str(sdxl_folder), family="sd15")


def test_load_controlnet_refuses_local_paths_for_untrusted_callers(tmp_path):
    folder = ensure_tiny_model("controlnet-sd15")
    assert load_controlnet(str(folder), family="sd15") is not None  # trusted: fine
    with as_caller(UNTRUSTED):
        for name in (str(folder), "./controlnet", "../x/y", str(tmp_path / "missing")):
            with pytest.raises(RefusedSourceError) as err:
                load_controlnet(name, family="sd15", field="controlnets[0].model")
            assert err.value.field == "controlnets[0].model"
        with pytest.raises(RefusedSourceError) as err:  # a hub id that is not cached, downloads off
            load_controlnet("someone/not-cached-controlnet", family="sd15")
        assert "cache" in str(err.value)
        assert load_controlnet("tiny-controlnet-sd15", family="sd15") is not None  # registry ids are fine
    with as_caller(CallerPolicy(trusted=False, allow_models=frozenset({"tiny-sd15"}))):
        with pytest.raises(RefusedSourceError):
            load_controlnet("tiny-controlnet-sd15", family="sd15")


def test_load_controlnet_caches_by_folder_dtype_and_device():
    clear_controlnet_cache()
    a = load_controlnet("tiny-controlnet-sd15", family="sd15")
    assert load_controlnet(str(ensure_tiny_model("controlnet-sd15")), family="sd15") is a
    half = load_controlnet("tiny-controlnet-sd15", family="sd15", torch_dtype=torch.bfloat16)
    assert half is not a and next(half.parameters()).dtype == torch.bfloat16


def test_controlnet_of_other_widths_does_not_fit():
    import diffusers

    from engine.loading.tiny import _read

    net = load_controlnet("tiny-controlnet-sdxl", family="sdxl")
    cfg = dict(_read("sdxl-small")[0]["components"]["unet"]["config"])
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(cfg)
    with pytest.raises(InvalidRequestError) as err:
        check_controlnet_fits(net, unet, "sdxl", field="controlnets[1].model")
    assert err.value.field == "controlnets[1].model" and "another base model" in str(err.value)


def test_ip_adapter_refuses_another_family_and_untrusted_paths():
    with pytest.raises(InvalidRequestError) as err:
        resolve_ip_adapter("tiny-ip-adapter-sdxl", family="sd15")
    assert err.value.field == "ip_adapter.model"
    source = resolve_ip_adapter("tiny-ip-adapter-sd15", family="sd15")
    weights = source.folder / source.subfolder / source.weight_name
    assert resolve_ip_adapter(str(weights), family="sd15").cross_attention_dim == source.cross_attention_dim
    with as_caller(UNTRUSTED), pytest.raises(RefusedSourceError) as err:
        resolve_ip_adapter(str(weights), family="sd15")
    assert err.value.field == "ip_adapter.model"
    sdxl = resolve_ip_adapter("tiny-ip-adapter-sdxl", family="sdxl")
    with pytest.raises(InvalidRequestError):
        check_ip_adapter_fits(sdxl, load_model("tiny-sd15").components["unet"])


def test_hub_id_of_a_registered_controlnet_gets_its_family_check():
    """fal's `path` names a hub repository; one the registry knows is checked against its family before any
    download (this test runs offline)."""
    with as_caller(UNTRUSTED), pytest.raises(InvalidRequestError) as err:
        load_controlnet("InstantX/FLUX.1-dev-Controlnet-Canny", family="sdxl", field="controlnets[0].path")
    assert err.value.field == "controlnets[0].path" and "flux" in str(err.value)


def test_models_name_a_tile_controlnet_of_their_family():
    for spec in registry().values():
        if spec.tile_controlnet:
            tile = find_adjunct("controlnet", spec.tile_controlnet)
            assert tile is not None and tile.family == spec.family
    assert get_spec("tiny-sd15").tile_controlnet == "tiny-controlnet-sd15"
