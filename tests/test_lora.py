"""LoRA: diffusers and kohya formats change the output, unloading restores the base bit-for-bit, two adapters with
scales match diffusers, compiled models hot-swap without recompiling, bad files leave the base model unchanged."""

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import images_close
from engine import Engine, errors
from engine.compiler.compile import compile_counters
from engine.loading.tiny import ensure_tiny_model

pytest.importorskip("peft")

KW = dict(model="tiny-sdxl", prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=4)


def make_lora(path: Path, seed: int, rank: int = 4, family: str = "sdxl") -> Path:
    """A random-weight LoRA on the tiny model's UNet attention projections, in diffusers/PEFT format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(ensure_tiny_model(family), subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    cls.save_lora_weights(save_directory=str(path.parent), unet_lora_layers=state, weight_name=path.name)
    return path


def to_kohya(src: Path, dst: Path) -> Path:
    """The same adapter with kohya key names (lora_unet_..., lora_down/lora_up, alpha)."""
    out = {}
    for key, value in load_file(src).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora.", 1)  # kind: "down.weight" or "up.weight"
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{kind}"] = value
        rank = value.shape[0] if kind.startswith("down") else value.shape[1]
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(out, dst)
    return dst


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a, b = make_lora(d / "a.safetensors", 1), make_lora(d / "b.safetensors", 2, rank=8)
    return {"a": a, "b": b, "kohya_a": to_kohya(a, d / "kohya_a.safetensors"),
            "sd15": make_lora(d / "sd15.safetensors", 3, family="sd15")}


def arr(res):
    return np.stack([np.asarray(i) for i in res.images])


def test_lora_changes_output_and_unloading_restores_base(loras):
    eng = Engine(device="cpu")
    base = arr(eng.generate(**KW))
    with_a = arr(eng.generate(**KW, loras=[{"path": str(loras["a"]), "scale": 1.0}]))
    assert not np.array_equal(base, with_a)
    assert np.array_equal(arr(eng.generate(**KW)), base), "a request without LoRA must run the base model"
    eng.generate(**KW, loras=[{"path": str(loras["a"])}])
    eng.unload_loras("tiny-sdxl")
    assert np.array_equal(arr(eng.generate(**KW)), base)


def test_kohya_format_equals_diffusers_format(loras):
    eng = Engine(device="cpu")
    a = eng.generate(**KW, loras=[{"path": str(loras["a"])}])
    k = eng.generate(**KW, loras=[{"path": str(loras["kohya_a"])}])
    assert images_close(a.images, k.images)[0]


def test_two_loras_with_scales_match_diffusers(loras):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    expected = pipe(prompt=KW["prompt"], width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(4)).images
    got = Engine(device="cpu").generate(**KW, guidance_scale=5.0, loras=[{"path": str(loras["a"]), "scale": 0.8},
                                                                          {"path": str(loras["b"]), "scale": 0.5}])
    ok, frac = images_close(expected, got.images)
    assert ok, frac


def test_stable_set_is_fused_and_unfusing_is_exact(loras):
    eng = Engine(device="cpu", compile_config={"lora_fuse_after": 2})
    base = arr(eng.generate(**KW))
    spec = [{"path": str(loras["a"]), "scale": 0.7}]
    first = eng.generate(**KW, loras=spec)
    second = eng.generate(**KW, loras=spec)  # second use in a row: fused before this job
    manager = eng._slot("tiny-sdxl").loras
    assert manager.fused
    assert images_close(first.images, second.images)[0]
    assert np.array_equal(arr(eng.generate(**KW)), base)  # a change of set unfuses, restoring exact base weights
    assert not manager.fused


def test_hot_swap_on_compiled_model_does_not_recompile(loras):
    eng = Engine(device="cpu", compile_config={"compile": True})
    eng.generate(**KW, loras=[{"path": str(loras["a"])}])
    graphs = compile_counters()["unique_graphs"]
    swapped = eng.generate(**KW, loras=[{"path": str(loras["b"]), "scale": 0.9}])
    assert compile_counters()["unique_graphs"] == graphs, "swapping the LoRA recompiled"
    assert eng._slot("tiny-sdxl").loras.swaps == 1
    fresh = Engine(device="cpu").generate(**KW, loras=[{"path": str(loras["b"]), "scale": 0.9}])
    ok, frac = images_close(fresh.images, swapped.images)
    assert ok, frac


def test_bad_loras_give_clear_errors_and_leave_base_unchanged(loras, tmp_path):
    eng = Engine(device="cpu")
    base = arr(eng.generate(**KW))
    corrupted = tmp_path / "corrupt.safetensors"
    corrupted.write_bytes(loras["a"].read_bytes()[:100])
    pickled = tmp_path / "lora.bin"
    torch.save(load_file(loras["a"]), pickled)
    cases = [
        (str(tmp_path / "missing.safetensors"), "no such file"),
        (str(corrupted), "not a readable safetensors"),
        (str(pickled), "only .safetensors"),
        (str(loras["sd15"]), "does not fit|matches no layer"),
    ]
    for path, message in cases:
        with pytest.raises(errors.InvalidRequestError, match=message) as info:
            eng.generate(**KW, loras=[{"path": path}])
        assert info.value.field == "loras.0.path"
        assert np.array_equal(arr(eng.generate(**KW)), base)
    with pytest.raises(errors.InvalidRequestError, match="loras"):
        eng.generate(**KW, loras=[{"path": str(loras["a"])}] * 5)
    with pytest.raises(errors.InvalidRequestError, match="loras.0.scale"):
        eng.generate(**KW, loras=[{"path": str(loras["a"]), "scale": 99}])
