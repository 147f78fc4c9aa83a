"""Composition matrix: every request feature x optimization level x backend, on tiny SDXL and tiny FLUX. Each cell
generates with the engine and compares against stock diffusers given the same request (same weights, seed, fp32),
or asserts the refusal the engine states for that combination (a LoRA on an exported denoiser: 422).

So a feature cannot silently stop working at another level: the matrix fails the cell where it does.

Rows are `FEATURES`; a new request feature (image-to-image, inpainting, ControlNet, ...) is one `Feature` row, plus
a line in `stock_images` if it brings a request field stock diffusers spells differently (an unknown field fails
loudly there rather than being ignored).

Columns: O0 / O1 / O2 x torch / onnxruntime, all with dtype fp32 so every cell is held to a tight tolerance (the
levels' half-precision dtype is covered against diffusers in bf16 by tests/test_lora.py and tests/test_compiler.py).
CI runs the O0 and O1 cells and the O2 cells in `O2_SAMPLE` (O2 compiles, which costs minutes on a small CPU);
ENGINE_FULL_MATRIX=1 runs every cell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import numpy as np
import pytest
import torch

from conftest import images_close
from engine import Engine, errors
from engine.loading.tiny import ensure_tiny_model
from engine.schedulers import build_scheduler
from test_lora import make_lora

pytest.importorskip("peft")

FULL = os.environ.get("ENGINE_FULL_MATRIX", "") not in ("", "0")
FAMILIES = ("sdxl", "flux")
LEVELS = ("O0", "O1", "O2")
BACKENDS = ("torch", "onnxruntime")
STOCK = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
BASE = {  # the plain request per family; features add or override fields
    "sdxl": dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                 seed=7),
    "flux": dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
                 seed=7, max_sequence_length=64),
}


@dataclass(frozen=True)
class Feature:
    """One request feature: the fields it adds to a family's plain request (given the test's assets), and what the
    engine answers instead of images where it cannot run."""

    name: str
    fields: Callable[[str, dict[str, Any]], dict[str, Any]]
    refused_when_exported: str | None = None  # regex of the 422 when the denoiser runs as an exported graph
    families: tuple[str, ...] = FAMILIES
    same_image_as_plain: tuple[str, ...] = ()  # families where the feature, by design, gives the plain image


FEATURES = [
    Feature("plain", lambda family, assets: {}),
    Feature("lora", lambda family, assets: {"loras": [{"path": str(assets["lora"][family]), "scale": 0.8}]},
            refused_when_exported=r"exported onnxruntime graph, which cannot take LoRA adapters"),
    Feature("scheduler", lambda family, assets: {"scheduler": {"sdxl": "dpmpp_2m_karras",
                                                               "flux": "flow_match_euler"}[family]},
            same_image_as_plain=("flux",)),  # FLUX's one preset is its own scheduler, rebuilt from its config
    Feature("num_images", lambda family, assets: {"num_images": 2}),
    Feature("negative", lambda family, assets: {"negative_prompt": "blurry", **(
        {"true_cfg_scale": 4.0} if family == "flux" else {"guidance_scale": 7.0})}),  # FLUX: true CFG
    Feature("img2img", lambda family, assets: {"image": assets["image"], "strength": 0.6},
            refused_when_exported=r"exported onnxruntime decoder graph, which cannot encode an image"),
    Feature("inpaint", lambda family, assets: {"image": assets["image"], "mask_image": assets["mask"],
                                               "strength": 0.9},
            refused_when_exported=r"exported onnxruntime decoder graph, which cannot encode an image"),
    Feature("controlnet", lambda family, assets: {"controlnets": [
        {"model": assets["controlnet"][family], "image": assets["control"], "conditioning_scale": 0.8}]},
            refused_when_exported=r"exported onnxruntime graph, whose inputs are fixed at export: it cannot take "
                                  r"ControlNet residuals"),
]
# The diffusers class stock_images runs for an image-conditioned feature.
STOCK_MODES = {
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline", ("flux", "img2img"): "FluxImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline", ("flux", "inpaint"): "FluxInpaintPipeline",
    ("sdxl", "controlnet"): "StableDiffusionXLControlNetPipeline", ("flux", "controlnet"): "FluxControlNetPipeline",
}

# O2 cells CI runs (family, feature, backend): the compiled torch path with the feature this issue fixed (LoRA) and a
# CFG batch on SDXL; on onnxruntime O2 compiles nothing (the exported graphs are left alone), so those cells are cheap.
O2_SAMPLE = {
    ("sdxl", "lora", "torch"), ("sdxl", "negative", "torch"), ("flux", "lora", "torch"),
    ("sdxl", "plain", "onnxruntime"), ("flux", "num_images", "onnxruntime"), ("flux", "lora", "onnxruntime"),
    ("sdxl", "img2img", "torch"), ("flux", "controlnet", "torch"),
}


def in_ci(family: str, feature: str, level: str, backend: str) -> bool:
    return level != "O2" or (family, feature, backend) in O2_SAMPLE


# -- the stock side ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory, stock_pipes) -> dict[str, Any]:
    from test_controlnet import make_controlnet
    from test_img2img import random_image
    from test_inpaint import random_mask

    d = tmp_path_factory.mktemp("matrix")
    return {"lora": {f: make_lora(d / f"{f}.safetensors", 5, family=f, strength=2.0) for f in FAMILIES},
            "image": random_image(64, 64, seed=1), "mask": random_mask(64, 64, seed=1),
            "control": random_image(64, 64, seed=2),
            "controlnet": {f: make_controlnet(stock_pipes[f], f, seed=3) for f in FAMILIES}}


@pytest.fixture(scope="module")
def stock_pipes() -> dict[str, Any]:
    pipes = {}
    for family in FAMILIES:
        pipe = getattr(diffusers, STOCK[family]).from_pretrained(ensure_tiny_model(family), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[family] = pipe
    return pipes


def stock_images(pipe: Any, family: str, request: dict[str, Any]) -> list[Any]:
    """The images stock diffusers makes for an engine request (fields translated to the pipeline's arguments)."""
    request = dict(request)
    kwargs: dict[str, Any] = {"generator": torch.Generator("cpu").manual_seed(request.pop("seed")),
                              "num_images_per_prompt": request.pop("num_images", 1)}
    loras = request.pop("loras", [])
    scheduler = request.pop("scheduler", None)
    mode, extra_components = None, {}
    if "image" in request:
        mode = "inpaint" if "mask_image" in request else "img2img"
        kwargs.update({k: request.pop(k) for k in ("image", "mask_image", "strength") if k in request})
    if "controlnets" in request:
        (control,) = request.pop("controlnets")
        mode, extra_components = "controlnet", {"controlnet": control["model"]}
        kwargs["image" if family == "sdxl" else "control_image"] = control["image"]
        kwargs["controlnet_conditioning_scale"] = control.get("conditioning_scale", 1.0)
    passthrough = {"prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale"}
    passthrough |= {"true_cfg_scale", "max_sequence_length"} if family == "flux" else set()
    unknown = set(request) - passthrough
    assert not unknown, f"teach stock_images how diffusers takes {sorted(unknown)}"
    kwargs.update(request)
    original = pipe.scheduler
    try:
        if scheduler is not None:
            pipe.scheduler = build_scheduler(scheduler, family, original.config)
        for i, lora in enumerate(loras):
            pipe.load_lora_weights(lora["path"], adapter_name=f"l{i}")
        if loras:
            pipe.set_adapters([f"l{i}" for i in range(len(loras))],
                              adapter_weights=[lo.get("scale", 1.0) for lo in loras])
        if mode is not None:
            target = getattr(diffusers, STOCK_MODES[family, mode]).from_pipe(pipe, **extra_components)
            target.set_progress_bar_config(disable=True)
            if mode == "img2img" and family == "sdxl":  # the class follows the image's size
                kwargs.pop("width"), kwargs.pop("height")
            return target(**kwargs).images
        return pipe(**kwargs).images
    finally:
        pipe.scheduler = original
        if loras:
            pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def expected(stock_pipes, assets) -> Callable[[str, Feature], list[Any]]:
    cache: dict[tuple[str, str], list[Any]] = {}

    def get(family: str, feature: Feature) -> list[Any]:
        if (family, feature.name) not in cache:
            cache[family, feature.name] = stock_images(stock_pipes[family], family, request_for(family, feature,
                                                                                                assets))
        return cache[family, feature.name]

    return get


def request_for(family: str, feature: Feature, assets: dict[str, Any]) -> dict[str, Any]:
    return {**BASE[family], **feature.fields(family, assets)}


# -- the engine side -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines() -> Callable[[str, str], Engine]:
    """One engine per (level, backend), shared by every cell of that column (models load and compile once)."""
    made: dict[tuple[str, str], Engine] = {}

    def get(level: str, backend: str) -> Engine:
        if (level, backend) not in made:
            made[level, backend] = Engine(device="cpu", opt_level=level,
                                          compile_config={"dtype": "fp32", "backend": backend})
        return made[level, backend]

    return get


def _cells() -> list[Any]:
    cells = []
    for family in FAMILIES:
        for feature in FEATURES:
            if family not in feature.families:
                continue
            for level in LEVELS:
                for backend in BACKENDS:
                    marks = [] if FULL or in_ci(family, feature.name, level, backend) else [pytest.mark.skip(
                        reason="O2 cell outside the CI sample (compile time); ENGINE_FULL_MATRIX=1 runs it")]
                    cells.append(pytest.param(family, feature, level, backend, marks=marks,
                                              id=f"{family}-{feature.name}-{level}-{backend}"))
    return cells


@pytest.mark.parametrize("family, feature, level, backend", _cells())
def test_cell(family, feature, level, backend, engines, expected, assets):
    eng, model = engines(level, backend), f"tiny-{family}"
    report = eng.optimization_report(model)
    exported = backend != "torch" and report.status("backend") == "applied"
    if backend != "torch" and not exported:
        pytest.skip(f"{backend} not used: {'; '.join(report.details('backend'))}")
    request = request_for(family, feature, assets)
    if exported and feature.refused_when_exported:
        with pytest.raises(errors.InvalidRequestError, match=feature.refused_when_exported) as info:
            eng.generate(model=model, **request)
        assert info.value.http_status == 422
        return
    got = eng.generate(model=model, **request).images
    want = expected(family, feature)
    assert [im.size for im in got] == [im.size for im in want]
    ok, fraction = images_close(want, got)
    worst = int(np.abs(np.stack([np.asarray(i, dtype=np.int16) for i in want])
                       - np.stack([np.asarray(i, dtype=np.int16) for i in got])).max())
    assert ok, (f"{family} {feature.name} at {level} on {backend}: {fraction:.4%} of values within one level of "
                f"stock diffusers (worst {worst}); passes: {report}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_feature_changes_the_stock_image(family, expected):
    """The matrix can fail: each feature changes diffusers' own image, so an engine that ignored it would not match."""
    plain = expected(family, FEATURES[0])
    for feature in FEATURES[1:]:
        if family in feature.families:
            same = images_close(plain, expected(family, feature), levels=0, fraction=1.0)[0]
            changed = not images_close(plain, expected(family, feature))[0]
            if family in feature.same_image_as_plain:
                assert same, f"{feature.name} was expected to give the plain image on {family}"
            else:
                assert changed, f"{feature.name} does not change the image"
