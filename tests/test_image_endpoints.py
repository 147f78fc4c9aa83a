"""fal's image-conditioned endpoints (image-to-image, inpainting, FLUX image-to-image, flux-general with ControlNets,
creative-upscaler): schemas with fal's names and defaults, 422s naming the fal field, and runs on tiny models in
process (FalService, as an untrusted caller, like the server)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from engine import errors
from engine.endpoints import (CreativeUpscalerInput, FastSDXLImageToImageInput, FastSDXLInpaintingInput,
                              FluxDevImageToImageInput, FluxGeneralInput, EndpointTable)
from engine.runtime.files import FileStore
from engine.service import FalService

TINY = {
    "fal-ai/fast-sdxl/image-to-image": "tiny-sdxl", "fal-ai/fast-sdxl/inpainting": "tiny-sdxl-inpainting",
    "fal-ai/flux/dev/image-to-image": "tiny-flux", "fal-ai/flux-general": "tiny-flux",
    "fal-ai/creative-upscaler": "tiny-sd15",
}


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def noise(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size=(64, 64)) -> Image.Image:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    return Image.fromarray(m)


def decode(image_obj: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image_obj["url"].split(",", 1)[1])))


@pytest.fixture(scope="module")
def fal(engine, tmp_path_factory):
    return FalService(engine, endpoint_overrides=TINY, files=FileStore(tmp_path_factory.mktemp("files")))


def test_schemas_follow_fal_defaults():
    i2i = FastSDXLImageToImageInput(prompt="x", image_url="data:,")
    assert (i2i.strength, i2i.num_inference_steps, i2i.guidance_scale, i2i.image_size) == (0.95, 25, 7.5, None)
    inpaint = FastSDXLInpaintingInput(prompt="x", image_url="a", mask_url="b")
    assert inpaint.strength == 0.95 and inpaint.format == "jpeg"
    flux = FluxDevImageToImageInput(prompt="x", image_url="a")
    assert (flux.strength, flux.num_inference_steps, flux.guidance_scale) == (0.95, 40, 3.5)
    general = FluxGeneralInput(prompt="x", controlnets=[{"path": "p", "control_image_url": "u"}])
    cn = general.controlnets[0]
    assert (cn.conditioning_scale, cn.start_percentage, cn.end_percentage) == (1.0, 0.0, 1.0)
    assert general.output_format == "png" and general.num_inference_steps == 28
    up = CreativeUpscalerInput(image_url="a")
    assert (up.model_type, up.scale, up.creativity, up.detail, up.shape_preservation) == ("SD_1_5", 2, 0.5, 1, 0.25)
    assert (up.guidance_scale, up.num_inference_steps) == (7.5, 20)
    assert up.prompt_suffix == " high quality, highly detailed, high resolution, sharp"
    table = EndpointTable()
    assert table.model_for("fal-ai/fast-sdxl/image-to-image") == "sdxl"
    assert table.model_for("fal-ai/flux-general") == "flux-dev"
    assert table.model_for("fal-ai/creative-upscaler", "SDXL") == "sdxl"


def _field_of(err: pytest.ExceptionInfo) -> str:
    return err.value.field


@pytest.mark.parametrize("app, args, field", [
    ("fal-ai/fast-sdxl/image-to-image", {"strength": 1.5}, "strength"),
    ("fal-ai/fast-sdxl/image-to-image", {"strength": -0.1}, "strength"),
    ("fal-ai/flux/dev/image-to-image", {"strength": 2}, "strength"),
    ("fal-ai/fast-sdxl/image-to-image", {"image_url": "data:image/png;base64,iVBORw0KGgoAAAAN"}, "image_url"),
    ("fal-ai/fast-sdxl/image-to-image", {"image_url": "data:image/png;base64,%%%"}, "image_url"),
    ("fal-ai/fast-sdxl/image-to-image", {"image_url": "/etc/passwd"}, "image_url"),
    ("fal-ai/fast-sdxl/image-to-image", {"image_url": "http://127.0.0.1/x.png"}, "image_url"),
    ("fal-ai/fast-sdxl/inpainting", {"mask_url": data_uri(mask((32, 64)))}, "mask_url"),
    ("fal-ai/fast-sdxl/inpainting", {"mask_url": "data:image/png;base64,AAAA"}, "mask_url"),
    ("fal-ai/flux-general", {"controlnets": [{"path": "tiny-controlnet-sdxl"}]}, "controlnets.0.path"),
    ("fal-ai/flux-general", {"controlnets": [{"path": "/tmp/controlnet"}]}, "controlnets.0.path"),
    ("fal-ai/flux-general", {"controlnets": [{"path": "tiny-controlnet-flux", "control_image_url": "data:,x"}]},
     "controlnets.0.control_image_url"),
    ("fal-ai/flux-general", {"controlnets": [{"path": "tiny-controlnet-flux", "start_percentage": 0.8,
                                              "end_percentage": 0.2}]}, "controlnets.0.end_percentage"),
    ("fal-ai/flux-general", {"ip_adapters": [{"path": "h94/IP-Adapter", "subfolder": "sdxl_models",
                                              "weight_name": "ip-adapter_sdxl.safetensors", "scale": 0.5}]},
     "ip_adapters.0.path"),
    ("fal-ai/creative-upscaler", {"creativity": 1.5}, "creativity"),
    ("fal-ai/creative-upscaler", {"image_url": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ"}, "image_url"),
])
def test_bad_inputs_are_422_naming_the_field(fal, app, args, field):
    base = {"prompt": "x", "image_url": data_uri(noise()), "mask_url": data_uri(mask())}
    if app == "fal-ai/flux-general":
        base = {"prompt": "x"}
        for entry in args.get("controlnets", []) + args.get("ip_adapters", []):
            entry.setdefault("control_image_url" if "scale" not in entry else "image_url", data_uri(noise()))
    if app == "fal-ai/creative-upscaler":
        base = {"image_url": data_uri(noise())}
    if app != "fal-ai/fast-sdxl/inpainting":
        base.pop("mask_url", None)
    with pytest.raises(errors.InvalidRequestError) as err:
        fal.run(app, {**base, **args})
    assert err.value.http_status == 422
    assert _field_of(err) == field, str(err.value)


# -- runs on tiny models ------------------------------------------------------------------------------------------
def test_image_to_image_follows_the_input_size_and_strength(fal):
    args = {"prompt": "a harbour", "image_url": data_uri(noise((96, 64))), "seed": 3, "num_inference_steps": 4,
            "sync_mode": True}
    out = fal.run("fal-ai/fast-sdxl/image-to-image", {**args, "strength": 0.5})
    image = decode(out["images"][0])
    assert image.size == (96, 64) and out["seed"] == 3 and out["has_nsfw_concepts"] == [None]
    other = decode(fal.run("fal-ai/fast-sdxl/image-to-image", {**args, "strength": 1.0})["images"][0])
    assert not np.array_equal(np.asarray(image), np.asarray(other))  # strength reaches the pipeline
    sized = fal.run("fal-ai/fast-sdxl/image-to-image", {**args, "image_size": {"width": 64, "height": 96}})
    assert decode(sized["images"][0]).size == (64, 96)  # image_size given: the image is resized to it


def test_inpainting_on_a_nine_channel_model_and_flux_image_to_image(fal):
    out = fal.run("fal-ai/fast-sdxl/inpainting", {
        "prompt": "a door", "image_url": data_uri(noise((64, 64), 1)), "mask_url": data_uri(mask()), "seed": 1,
        "num_inference_steps": 2, "sync_mode": True})
    assert decode(out["images"][0]).size == (64, 64)
    out = fal.run("fal-ai/flux/dev/image-to-image", {
        "prompt": "a door", "image_url": data_uri(noise((64, 64), 1)), "seed": 1, "num_inference_steps": 2,
        "sync_mode": True})
    assert decode(out["images"][0]).size == (64, 64)


def test_flux_general_controlnet_changes_the_image(fal):
    control = data_uri(noise((64, 64), 5))
    args = {"prompt": "a door", "seed": 1, "num_inference_steps": 2, "image_size": {"width": 64, "height": 64},
            "sync_mode": True}
    plain = decode(fal.run("fal-ai/flux-general", args)["images"][0])
    controlled = decode(fal.run("fal-ai/flux-general", {**args, "controlnets": [
        {"path": "tiny-controlnet-flux", "control_image_url": control, "conditioning_scale": 1.0,
         "end_percentage": 0.5}]})["images"][0])
    assert plain.size == controlled.size == (64, 64)
    assert not np.array_equal(np.asarray(plain), np.asarray(controlled))


def test_a_trusted_folder_controlnet_of_another_family_is_named_by_its_fal_field(engine, tmp_path):
    from engine.loading.tiny import ensure_tiny_model

    trusted = FalService(engine, endpoint_overrides=TINY, trusted=True, files=FileStore(tmp_path))
    folder = str(ensure_tiny_model("controlnet-sdxl"))  # a folder: its family is read when it is loaded
    with pytest.raises(errors.InvalidRequestError) as err:
        trusted.run("fal-ai/flux-general", {"prompt": "x", "num_inference_steps": 1,
                                            "image_size": {"width": 64, "height": 64},
                                            "controlnets": [{"path": folder, "control_image_url": data_uri(noise())}]})
    assert err.value.field == "controlnets.0.path" and "sdxl" in str(err.value)


def test_creative_upscaler_on_tiny_sd15_with_its_tile_controlnet(fal):
    out = fal.run("fal-ai/creative-upscaler", {"image_url": data_uri(noise((48, 40), 2)), "seed": 4, "scale": 2,
                                               "num_inference_steps": 2, "sync_mode": True})
    assert out["seed"] == 4 and decode(out["image"]).size == (96, 80)
    assert out["timings"]["redraw"] > 0
