"""A model written as an original-layout single file generates the same images as its diffusers folder."""

import pytest
import torch

from conftest import images_close
from engine import Engine, errors
from engine.loading.original_layout import save_original_layout
from engine.loading.pretrained import load_folder
from engine.loading.tiny import ensure_tiny_model
from stock_models import build_sdxl

ARGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=96, num_inference_steps=2,
            guidance_scale=5.0, seed=3, num_images=2)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_single_file_matches_folder(engine, tmp_path, family):
    folder = ensure_tiny_model(family)
    path = save_original_layout(load_folder(folder), family, tmp_path / f"{family}.safetensors")
    extra = {"max_sequence_length": 64} if family == "flux" else {}
    from_folder = engine.generate(model=f"tiny-{family}", **ARGS, **extra)
    from_file = engine.generate(model=str(path), **ARGS, **extra)
    ok, frac = images_close(from_folder.images, from_file.images, levels=0, fraction=1.0)
    assert ok, frac
    assert engine.load(str(path)).family.name == family


def test_single_file_of_custom_architecture_needs_config(tmp_path):
    """A file whose shapes match no shipped config: a clear error, then it loads with config=<its folder>."""
    pipe = build_sdxl(tmp_path / "folder")
    pipe.set_progress_bar_config(disable=True)
    components = dict(pipe.components)
    path = save_original_layout(components, "sdxl", tmp_path / "custom.safetensors")
    eng = Engine(device="cpu")
    with pytest.raises(errors.ModelLoadError, match="config"):
        eng.load(str(path))
    eng.load(str(path), config=str(tmp_path / "folder"))
    got = eng.generate(model=str(path), **ARGS)
    expected = pipe(prompt=ARGS["prompt"], negative_prompt="blurry", width=64, height=96, num_inference_steps=2,
                    guidance_scale=5.0, num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(3)).images
    assert images_close(expected, got.images)[0]


def test_pickle_single_file_refused_by_default(tmp_path):
    from safetensors.torch import load_file

    folder = ensure_tiny_model("sd15")
    path = save_original_layout(load_folder(folder), "sd15", tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(path)}, ckpt)
    with pytest.raises(errors.UnsafeCheckpointError, match="allow_pickle"):
        Engine(device="cpu").load(str(ckpt))
    res = Engine(device="cpu", allow_pickle=True).generate(model=str(ckpt), prompt="x", width=64, height=64,
                                                           num_inference_steps=1, seed=1)
    assert res.images[0].size == (64, 64)


def test_corrupted_single_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(errors.ModelLoadError):
        Engine(device="cpu").load(str(bad))
