"""LoRA: diffusers and kohya formats change the output, unloading restores the base bit-for-bit, two adapters with
scales match diffusers, compiled models hot-swap without recompiling, bad files leave the base model unchanged.
At every level (O0, O1, O2: fused projections, channels-last, compile) a LoRA changes the image and matches stock
diffusers with the same LoRA in the same dtype; a compiled model takes its first LoRA without recompiling."""

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


# LoRA targets per family: the UNet's attention projections; FLUX's q/k/v (the fused ones), the text stream's
# added projections and a single block's MLP projection, like trained FLUX LoRAs.
LORA_TARGETS = {"sdxl": ["to_q", "to_k", "to_v", "to_out.0"], "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
                "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                         "proj_mlp"]}


def make_lora(path: Path, seed: int, rank: int = 4, family: str = "sdxl", strength: float = 1.0) -> Path:
    """A random-weight LoRA on the tiny model's denoiser (attention projections), in diffusers/PEFT format.
    `strength` scales lora_B, for a LoRA whose effect stands out of half-precision noise."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    if family == "flux":
        model = diffusers.FluxTransformer2DModel.from_pretrained(ensure_tiny_model(family), subfolder="transformer")
    else:
        model = diffusers.UNet2DConditionModel.from_pretrained(ensure_tiny_model(family), subfolder="unet")
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=LORA_TARGETS[family]))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    state = {k: v * strength if "lora_B" in k or "lora.up" in k else v for k, v in state.items()}
    if family == "flux":
        diffusers.FluxPipeline.save_lora_weights(save_directory=str(path.parent), transformer_lora_layers=state,
                                                 weight_name=path.name)
    else:
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
    base = arr(eng.generate(**KW))
    graphs = compile_counters()["unique_graphs"]
    eng.generate(**KW, loras=[{"path": str(loras["a"])}])
    assert compile_counters()["unique_graphs"] == graphs, "the first LoRA recompiled (no slot prepared?)"
    swapped = eng.generate(**KW, loras=[{"path": str(loras["b"]), "scale": 0.9}])
    assert compile_counters()["unique_graphs"] == graphs, "swapping the LoRA recompiled"
    manager = eng._slot("tiny-sdxl").loras
    assert (manager.swaps, manager.recompiling_loads) == (2, 0)  # both swapped into the slot prepared at load
    fresh = Engine(device="cpu").generate(**KW, loras=[{"path": str(loras["b"]), "scale": 0.9}])
    ok, frac = images_close(fresh.images, swapped.images)
    assert ok, frac
    eng.unload_loras("tiny-sdxl")  # the slot stays, zeroed: the base image exactly, in the same compiled code
    assert np.array_equal(arr(eng.generate(**KW)), base)
    assert compile_counters()["unique_graphs"] == graphs


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


# -- every level: fused projections, channels-last, compile ------------------------------------------------------

LEVEL_CELLS = {  # id -> (opt level, compile_config overrides)
    "O0": ("O0", {}),
    "O1": ("O1", {}),  # dtype auto: bf16 where the CPU has it, else fp32
    "O2": ("O2", {}),
    "O1-bf16": ("O1", {"dtype": "bf16"}),
}
FAMILY_KW = {"sdxl": dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=4,
                          guidance_scale=5.0),
             "flux": dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=4,
                          guidance_scale=3.5, max_sequence_length=64)}  # the tiny model's default (stock: 512)
STOCK = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


def bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def mad(a, b) -> float:
    """Mean absolute difference of two image lists, in 8-bit levels."""
    return float(np.abs(arr_of(a).astype(np.int16) - arr_of(b).astype(np.int16)).mean())


def arr_of(images):
    return np.stack([np.asarray(i) for i in images])


@pytest.fixture(scope="module")
def level_loras(tmp_path_factory):
    """Two LoRAs per family (ranks 4 and 8); FLUX's strengthened so their effect stands out of bf16 noise."""
    d = tmp_path_factory.mktemp("level-loras")
    strength = {"sdxl": 1.0, "flux": 3.0}
    return {f: (make_lora(d / f"{f}-a.safetensors", 1, family=f, strength=strength[f]),
                make_lora(d / f"{f}-b.safetensors", 2, rank=8, family=f, strength=strength[f])) for f in FAMILY_KW}


@pytest.fixture(scope="module")
def stock_lora_images():
    """Stock diffusers images (cached): (family, dtype, lora file or None, scale) -> images."""
    pipes, cache = {}, {}

    def get(family, dtype, lora, scale=1.0):
        key = (family, dtype, str(lora), scale)
        if key not in cache:
            if (family, dtype) not in pipes:
                pipe = getattr(diffusers, STOCK[family]).from_pretrained(ensure_tiny_model(family))
                pipe.to(dtype)
                pipe.set_progress_bar_config(disable=True)
                pipes[family, dtype] = pipe
            pipe = pipes[family, dtype]
            kw = dict(FAMILY_KW[family])
            seed = kw.pop("seed")
            if lora is not None:
                pipe.load_lora_weights(str(lora), adapter_name="x")
                pipe.set_adapters(["x"], adapter_weights=[scale])
            try:
                cache[key] = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed)).images
            finally:
                if lora is not None:
                    pipe.unload_lora_weights()
        return cache[key]

    return get


@pytest.fixture(scope="module")
def level_engines():
    engines = {}

    def get(cell):
        if cell not in engines:
            level, overrides = LEVEL_CELLS[cell]
            engines[cell] = Engine(device="cpu", opt_level=level, compile_config=overrides or None)
        return engines[cell]

    return get


def denoiser_of(eng, model):
    slot = eng._slot(model)
    return slot.loaded.components[slot.loaded.family.denoiser]


@pytest.mark.parametrize("family", list(FAMILY_KW))
@pytest.mark.parametrize("cell", list(LEVEL_CELLS))
def test_lora_at_each_level_matches_diffusers(family, cell, level_loras, level_engines, stock_lora_images):
    """With-LoRA differs from without (as much as in diffusers) and matches diffusers with the same LoRA in the same
    dtype: fp32 within one level, bf16 within a quarter of the LoRA's own effect. Compiled (O2): the first LoRA and
    a swap to a second one run in the code compiled at load (slots prepared before compiling)."""
    if LEVEL_CELLS[cell][1].get("dtype") == "bf16" and not bf16_supported():
        pytest.skip("this CPU has no native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)")
    model, kw = f"tiny-{family}", FAMILY_KW[family]
    a, b = level_loras[family]
    eng = level_engines(cell)
    base = eng.generate(model=model, **kw).images
    dtype = next(denoiser_of(eng, model).parameters()).dtype
    graphs = compile_counters()["unique_graphs"]
    with_a = eng.generate(model=model, **kw, loras=[{"path": str(a)}]).images
    if eng.optimization_report(model).status("compile") == "applied":
        assert compile_counters()["unique_graphs"] == graphs, "the first LoRA on a compiled model recompiled"
    stock_base, stock_a = stock_lora_images(family, dtype, None), stock_lora_images(family, dtype, a)
    effect = mad(stock_a, stock_base)
    assert effect > 2.0, f"the test LoRA is too weak to measure ({effect:.2f} levels)"
    assert mad(with_a, base) > effect / 2, f"{cell}: the LoRA has (almost) no effect"
    if dtype == torch.float32:
        ok, frac = images_close(stock_a, with_a)
        assert ok, f"{cell} fp32: only {frac:.4%} within one level of diffusers"
    else:
        diff = mad(with_a, stock_a)
        assert diff < effect / 4, f"{cell} {dtype}: {diff:.2f} levels from diffusers, the LoRA's effect is {effect:.2f}"

    # a second LoRA: swapped in place on a compiled model (no recompile), another image, still diffusers' image
    with_b = eng.generate(model=model, **kw, loras=[{"path": str(b), "scale": 0.9}]).images
    stock_b = stock_lora_images(family, dtype, b, 0.9)
    assert mad(with_b, with_a) > mad(stock_b, stock_a) / 2
    if dtype == torch.float32:
        assert images_close(stock_b, with_b)[0]
    else:
        assert mad(with_b, stock_b) < mad(stock_b, stock_base) / 4
    manager = eng._slot(model).loras
    if eng.optimization_report(model).status("compile") == "applied":
        assert compile_counters()["unique_graphs"] == graphs, "swapping the LoRA recompiled"
        assert (manager.swaps, manager.recompiling_loads) == (2, 0)
    # no LoRA again: the base image exactly (adapters off, or a compiled model's slot at zero)
    assert np.array_equal(arr_of(eng.generate(model=model, **kw).images), arr_of(base))


@pytest.mark.parametrize("family", list(FAMILY_KW))
def test_fused_model_holds_each_weight_once_and_loras_unfuse_it(family, tmp_path):
    """fuse_qkv drops the separate q/k/v layers (same parameter count as the unfused model); the first LoRA splits
    the fused weights back exactly, and PEFT injects into the separate layers."""
    from engine.compiler.layout import SPLITS_ATTR

    model, kw = f"tiny-{family}", dict(FAMILY_KW[family], num_inference_steps=1)
    plain = Engine(device="cpu", opt_level="O0")
    fused = Engine(device="cpu", opt_level="O1", compile_config={"dtype": "fp32"})
    unfused_net, fused_net = denoiser_of(plain, model), denoiser_of(fused, model)
    assert fused.optimization_report(model).status("fuse_qkv") == "applied"
    assert sum(p.numel() for p in fused_net.parameters()) == sum(p.numel() for p in unfused_net.parameters())
    attns = [m for m in fused_net.modules() if getattr(m, SPLITS_ATTR, None)]
    assert attns and not any(hasattr(m, "to_k") for m in attns)
    reference = {k: v for k, v in unfused_net.state_dict().items() if ".to_k." in k}
    base = fused.generate(model=model, **kw).images
    fused.generate(model=model, **kw, loras=[{"path": str(make_lora(tmp_path / "l.safetensors", 3, family=family))}])
    assert not any(getattr(m, SPLITS_ATTR, None) or hasattr(m, "to_qkv") for m in fused_net.modules())
    split = {k.replace(".base_layer", ""): v for k, v in fused_net.state_dict().items()
             if ".to_k." in k and "lora" not in k}
    assert split.keys() == reference.keys()
    assert all(torch.equal(split[k], reference[k]) for k in reference), "splitting the fused weight is not exact"
    fused.unload_loras(model)  # no adapters left: fused again, the same image as before any LoRA
    assert sum(1 for m in fused_net.modules() if getattr(m, SPLITS_ATTR, None)) == len(attns)
    assert np.array_equal(arr_of(fused.generate(model=model, **kw).images), arr_of(base))


def test_lora_slots_can_be_turned_off_to_keep_fused_projections():
    from engine.compiler import CompileConfig, optimize
    from engine.loading import load_model

    loaded = load_model("tiny-flux")
    report, _ = optimize(loaded.components, loaded.family, torch.device("cpu"),
                         CompileConfig(fuse_qkv=True, compile=True, lora_slots=False))
    assert report.status("lora_slots") == "skipped" and "lora_slots=False" in report.details("lora_slots")[0]
    attn = loaded.components["transformer"].transformer_blocks[0].attn
    assert getattr(attn, "fused_projections", False) and not hasattr(attn, "to_q")
