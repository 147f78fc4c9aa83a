"""Engine API behaviour on the shipped tiny models: defaults, seeds, typed errors, loading paths, threads, CLI."""

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from engine import Engine, GenerateRequest, errors
from engine.loading.tiny import ensure_tiny_model
from engine.pipelines.base import PromptTruncatedWarning

SMALL = dict(width=64, height=64, num_inference_steps=1)


def _arr(result):
    return np.stack([np.asarray(i) for i in result.images])


def test_generate_shape_seed_and_timings(engine):
    res = engine.generate(model="tiny-sdxl", prompt="a lighthouse at dusk", negative_prompt="", width=96, height=64,
                          num_inference_steps=2, guidance_scale=5.0, seed=7, num_images=2)
    assert [im.size for im in res.images] == [(96, 64)] * 2
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in res.images)
    assert res.seed == 7
    assert set(res.timings) == {"encode", "denoise", "decode", "total"}
    assert res.timings["total"] >= res.timings["denoise"] > 0


def test_seed_drawn_when_missing_and_reproducible(engine):
    first = engine.generate(model="tiny-sd15", prompt="a cat", **SMALL)
    assert isinstance(first.seed, int) and 0 <= first.seed < 2**32
    again = engine.generate(model="tiny-sd15", prompt="a cat", seed=first.seed, **SMALL)
    assert np.array_equal(_arr(first), _arr(again))


def test_defaults_come_from_the_registry(engine):
    res = engine.generate(model="tiny-flux", prompt="a cat", seed=1)
    spec = engine.load("tiny-flux").spec.defaults
    assert res.images[0].size == (spec.width, spec.height)
    assert res.num_inference_steps == spec.steps and res.guidance_scale == spec.guidance_scale


@pytest.mark.parametrize(
    "bad, field, allowed",
    [
        ({"model": "tiny-sd15", "width": 100}, "width", "multiples of 8"),
        ({"model": "tiny-flux", "height": 72}, "height", "multiples of 16"),
        ({"model": "tiny-sd15", "width": 32}, "width", "from 64 to"),
        ({"model": "tiny-sdxl", "height": 8192}, "height", "to 4096"),
        ({"model": "tiny-sd15", "num_inference_steps": 0}, "num_inference_steps", "1..150"),
        ({"model": "tiny-sd15", "num_inference_steps": 151}, "num_inference_steps", "1..150"),
        ({"model": "tiny-sd15", "num_images": 0}, "num_images", "1..8"),
        ({"model": "tiny-sd15", "num_images": 9}, "num_images", "1..8"),
        ({"model": "tiny-sd15", "guidance_scale": -1.0}, "guidance_scale", "0.0.."),
        ({"model": "tiny-sd15", "seed": -5}, "seed", "0.."),
        ({"model": "tiny-sd15", "max_sequence_length": 64}, "max_sequence_length", None),
    ],
)
def test_bad_input_names_field_and_range(engine, bad, field, allowed):
    kwargs = {"prompt": "x", **SMALL, **bad}
    with pytest.raises(errors.InvalidRequestError) as info:
        engine.generate(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    if allowed:
        assert allowed in str(info.value)
    # the engine stays usable
    assert engine.generate(model="tiny-sd15", prompt="ok", seed=1, **SMALL).images


def test_unknown_model_lists_known_ids(engine):
    with pytest.raises(errors.ModelNotFoundError) as info:
        engine.generate(model="no-such-model", prompt="x")
    assert "tiny-sdxl" in str(info.value) and "tiny-sdxl" in info.value.known


def test_missing_path(engine, tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        engine.generate(model=str(tmp_path / "nothing.safetensors"), prompt="x")
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        engine.generate(model=str(tmp_path / "missing-folder") + "/", prompt="x")


def test_hub_id_offline_gives_clear_error(engine):
    with pytest.raises(errors.HubUnavailableError) as info:
        engine.load("someone/not-a-cached-model")
    text = str(info.value)
    assert "someone/not-a-cached-model" in text and "local" in text


def _copy_tiny(tmp_path, name="sd15"):
    dst = tmp_path / f"copy-{name}"
    shutil.copytree(ensure_tiny_model(name), dst)
    return dst


def test_corrupted_safetensors_in_folder(engine, tmp_path):
    folder = _copy_tiny(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(errors.ModelLoadError, match="unet"):
        engine.load(str(folder))
    assert str(folder) not in engine.loaded_models()
    assert engine.generate(model="tiny-sd15", prompt="ok", seed=1, **SMALL).images


def test_pickle_weights_in_folder_refused_by_default(tmp_path):
    folder = _copy_tiny(tmp_path)
    import torch
    from safetensors.torch import load_file

    sub = folder / "vae"
    state = load_file(sub / "diffusion_pytorch_model.safetensors")
    (sub / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, sub / "diffusion_pytorch_model.bin")
    with pytest.raises(errors.UnsafeCheckpointError, match="allow_pickle"):
        Engine(device="cpu").load(str(folder))
    loaded = Engine(device="cpu", allow_pickle=True).load(str(folder))
    assert loaded.family.name == "sd15"


def test_not_a_model_folder(engine, tmp_path):
    with pytest.raises(errors.ModelLoadError, match="model_index.json"):
        engine.load(str(tmp_path))


def test_overlong_prompt_is_truncated_with_warning(engine):
    prompt = " ".join(["lighthouse"] * 200)
    with pytest.warns(PromptTruncatedWarning):
        res = engine.generate(model="tiny-sd15", prompt=prompt, seed=3, **SMALL)
    assert res.images


def test_request_object_and_keywords_are_equivalent(engine):
    req = GenerateRequest(model="tiny-sd15", prompt="a cat", seed=4, **SMALL)
    a = engine.generate(req)
    b = engine.generate(model="tiny-sd15", prompt="a cat", seed=4, **SMALL)
    assert np.array_equal(_arr(a), _arr(b))
    with pytest.raises(errors.InvalidRequestError):
        engine.generate(req, prompt="both")
    with pytest.raises(errors.InvalidRequestError, match="unknown_field"):
        engine.generate(model="tiny-sd15", prompt="x", unknown_field=1)


def test_load_cache_and_unload():
    eng = Engine(device="cpu")
    first = eng.load("tiny-sd15")
    assert eng.load("tiny-sd15") is first
    assert eng.loaded_models() == ["tiny-sd15"]
    assert eng.unload("tiny-sd15") is True
    assert eng.unload("tiny-sd15") is False
    assert eng.loaded_models() == []


def test_threads_share_one_engine():
    eng = Engine(device="cpu")
    seeds = [1, 2, 3, 4]
    expected = {s: _arr(eng.generate(model="tiny-sdxl", prompt="a cat", seed=s, **SMALL)) for s in seeds}
    eng.unload("tiny-sdxl")  # threads race to load it again: it must load once and serve all
    got, failures = {}, []

    def work(seed):
        try:
            got[seed] = _arr(eng.generate(model="tiny-sdxl", prompt="a cat", seed=seed, **SMALL))
        except Exception as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures
    assert all(np.array_equal(got[s], expected[s]) for s in seeds)
    assert eng.loaded_models() == ["tiny-sdxl"]


def test_models_listing():
    rows = {r["id"]: r for r in Engine.models()}
    assert {"sd15", "sdxl", "sdxl-turbo", "flux-dev", "flux-schnell", "tiny-sd15", "tiny-sdxl", "tiny-flux"} <= set(rows)
    assert rows["tiny-sdxl"]["offline"] is True and rows["tiny-sdxl"]["family"] == "sdxl"
    assert rows["flux-dev"]["offline"] is False
    assert rows["flux-dev"]["source"] == "black-forest-labs/FLUX.1-dev"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_and_models(tmp_path):
    out = tmp_path / "img.png"
    run = _cli("generate", "--model", "tiny-sdxl", "--prompt", "a lighthouse", "--width", "96", "--height", "64",
               "--steps", "2", "--seed", "5", "--num-images", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "denoise" in run.stdout and "seed 5" in run.stdout
    for i in range(2):
        assert Image.open(tmp_path / f"img-{i}.png").size == (96, 64)
    listing = _cli("models")
    assert listing.returncode == 0 and "tiny-flux" in listing.stdout and "offline" in listing.stdout
    bad = _cli("generate", "--model", "tiny-sd15", "--prompt", "x", "--width", "100", "--out", str(out))
    assert bad.returncode == 2 and "width" in bad.stderr and "Traceback" not in bad.stderr
