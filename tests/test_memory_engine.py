"""The memory plan inside the Engine: offload placements give the resident image at every level, an out-of-memory
error steps one rung down and retries, per-request VAE options, and least-recently-used eviction.

On the CPU the automatic plan is always resident (offload needs an accelerator), so the offload rungs are forced
with `memory_plan=`; their hooks then run with the CPU as the onload device, which exercises the same code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Engine
from engine.errors import InsufficientMemoryError, InvalidRequestError

ARGS = dict(prompt="a red bicycle", num_inference_steps=2, seed=3, width=64, height=64)
OFFLOAD_PLANS = ["text_encoders_offloaded", "model_offload", "group_offload"]


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in result.images])


@pytest.fixture(scope="module")
def resident_images() -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for level in ("O0", "O1"):
        eng = Engine(device="cpu", opt_level=level)
        for model in ("tiny-sdxl", "tiny-flux"):
            out[(level, model)] = _pixels(eng.generate(model=model, **ARGS))
    return out


@pytest.mark.parametrize("level", ["O0", "O1"])
@pytest.mark.parametrize("plan", OFFLOAD_PLANS)
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_offload_plans_reproduce_the_resident_image(resident_images, model, plan, level):
    eng = Engine(device="cpu", opt_level=level, memory_plan=plan)
    got = _pixels(eng.generate(model=model, **ARGS))
    assert np.array_equal(got, resident_images[(level, model)])
    report = eng.optimization_report(model)
    assert report.memory_plan[0].startswith(f"memory plan: {plan} ")
    assert any(line.startswith("placement") for line in report.memory_plan), report.memory_plan
    # a second request (prompt cache hit at O1, encoders already swapped back) gives the same image again
    assert np.array_equal(_pixels(eng.generate(model=model, **ARGS)), got)


def test_automatic_plan_on_the_cpu_is_resident_and_reported():
    eng = Engine(device="cpu")
    eng.load("tiny-sdxl")
    lines = eng.optimization_report("tiny-sdxl").memory_plan
    assert lines[0].startswith("memory plan: resident for tiny-sdxl")
    assert any("rejected" in line for line in lines) is False
    assert "memory plan" in str(eng.optimization_report("tiny-sdxl"))
    assert eng.optimization_report("tiny-sdxl").as_dict()["memory_plan"] == lines


def test_unknown_or_lossy_forced_plan_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="memory_plan"):
        Engine(device="cpu", memory_plan="everything_on_a_floppy")
    with pytest.raises(InvalidRequestError, match="allow_lossy"):
        Engine(device="cpu", memory_plan="fp8+resident")


def _inject_oom_once(eng: Engine, model: str) -> list[int]:
    """The denoiser's first call raises CUDA's out-of-memory error type (torch.OutOfMemoryError)."""
    calls = [0]
    denoiser = eng._slots[model].loaded.components[eng._slots[model].loaded.family.denoiser]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    denoiser.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_out_of_memory_steps_down_one_rung_and_retries(resident_images, model):
    eng = Engine(device="cpu", memory_plan="resident")
    eng.load(model)
    calls = _inject_oom_once(eng, model)
    result = eng.generate(model=model, **ARGS)
    assert calls[0] == 1  # the failed placement is gone: the retry ran on the reloaded model
    assert np.array_equal(_pixels(result), resident_images[("O0", model)])
    slot = eng._slots[model]
    assert slot.plan.rung == "text_encoders_offloaded"
    assert any(line.startswith("fallback: out of memory with resident") for line in
               eng.optimization_report(model).memory_plan)
    # the next request starts from the new plan and needs no fallback
    assert np.array_equal(_pixels(eng.generate(model=model, **ARGS)), resident_images[("O0", model)])
    assert eng._slots[model] is slot


def test_out_of_memory_at_the_last_rung_is_a_clear_error_and_the_engine_stays_usable(resident_images):
    eng = Engine(device="cpu", memory_plan="group_offload")
    eng.load("tiny-sdxl")
    _inject_oom_once(eng, "tiny-sdxl")
    with pytest.raises(InsufficientMemoryError, match="smallest memory plan"):
        eng.generate(model="tiny-sdxl", **ARGS)
    assert np.array_equal(_pixels(eng.generate(model="tiny-sdxl", **ARGS)), resident_images[("O0", "tiny-sdxl")])


def test_other_errors_are_not_taken_for_out_of_memory():
    eng = Engine(device="cpu", memory_plan="resident")
    eng.load("tiny-sdxl")
    denoiser = eng._slots["tiny-sdxl"].loaded.components["unet"]
    handle = denoiser.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        eng.generate(model="tiny-sdxl", **ARGS)
    handle.remove()
    assert eng._slots["tiny-sdxl"].plan.rung == "resident"


def test_vae_slicing_and_tiling_follow_the_request():
    eng = Engine(device="cpu")
    vae = eng._slot("tiny-sdxl").loaded.components["vae"]
    many = eng.generate(model="tiny-sdxl", **{**ARGS, "num_images": 5})
    assert vae.use_slicing and not vae.use_tiling
    eng.generate(model="tiny-sdxl", **ARGS)
    assert not vae.use_slicing and not vae.use_tiling
    one = Engine(device="cpu").generate(model="tiny-sdxl", **{**ARGS, "num_images": 5})
    assert np.array_equal(_pixels(many), _pixels(one))  # slicing is exact


def test_least_recently_used_model_is_evicted_at_max_loaded_models():
    eng = Engine(device="cpu", max_loaded_models=2)
    eng.load("tiny-sdxl")
    eng.load("tiny-flux")
    eng.generate(model="tiny-sdxl", **ARGS)  # tiny-flux is now the least recently used
    eng.load("tiny-sd15")
    assert sorted(eng.loaded_models()) == ["tiny-sd15", "tiny-sdxl"]
    with pytest.raises(InvalidRequestError):
        Engine(device="cpu", max_loaded_models=0)


def test_model_that_does_not_fit_beside_the_others_evicts_them():
    probe = Engine(device="cpu")
    plans = {m: probe._slot(m).plan for m in ("tiny-sdxl", "tiny-flux")}
    first, second = sorted(plans, key=lambda m: plans[m].peak_bytes)  # the larger peak comes second
    budget = plans[second].peak_bytes  # each fits alone; not the second beside the first's resident weights
    assert plans[first].resident_bytes > 0
    eng = Engine(device="cpu", max_memory=budget)
    eng.load(first)
    eng.load(second)
    assert eng.loaded_models() == [second]


def test_settings_an_offloading_plan_cannot_combine_with_are_dropped_and_reported():
    from types import SimpleNamespace

    from engine.compiler import config_for_level
    from engine.compiler.plan_rules import fit_config_to_plan

    config = config_for_level("O3", backend="tensorrt", quant="int8_weight_only")
    fitted, dropped = fit_config_to_plan(config, SimpleNamespace(offloads=True, lossy=True, rung="fp8+group_offload",
                                                                 storage="fp8", placement="group_offload"))
    assert (fitted.cuda_graphs, fitted.backend, fitted.quant, fitted.fuse_qkv, fitted.compile_fullgraph) == \
        (False, "torch", "none", False, False)
    assert [f for f, _ in dropped] == ["cuda_graphs", "backend", "quant", "fuse_qkv", "compile_fullgraph"]
    flux = SimpleNamespace(offloads=False, lossy=True, rung="fp8+resident", storage="fp8", placement="resident",
                           sizes=SimpleNamespace(family="flux"))  # no per-job IP-Adapters: q/k/v stay fused;
    # fp8 casts weights in per-layer hooks: no CUDA graphs, compiled with graph breaks
    assert [f for f, _ in fit_config_to_plan(config, flux)[1]] == ["quant", "cuda_graphs", "compile_fullgraph"]
    sdxl = SimpleNamespace(**{**vars(flux), "sizes": SimpleNamespace(family="sdxl")})
    assert [f for f, _ in fit_config_to_plan(config, sdxl)[1]] == ["quant", "fuse_qkv", "cuda_graphs",
                                                                    "compile_fullgraph"]
    int8 = SimpleNamespace(**{**vars(sdxl), "storage": "int8", "rung": "int8+resident"})
    assert [f for f, _ in fit_config_to_plan(config, int8)[1]] == ["quant", "fuse_qkv"]
    swap = SimpleNamespace(offloads=True, lossy=False, rung="model_offload", storage="compute", placement="swap")
    assert [f for f, _ in fit_config_to_plan(config, swap)[1]] == ["cuda_graphs", "backend"]
    resident = SimpleNamespace(offloads=False, lossy=False, rung="resident", storage="compute")
    assert fit_config_to_plan(config, resident) == (config, [])

    eng = Engine(device="cpu", memory_plan="model_offload", compile_config={"backend": "onnxruntime"})
    eng.generate(model="tiny-sdxl", **ARGS)
    report = eng.optimization_report("tiny-sdxl")
    assert any("dropped" in d and "model_offload" in d for d in report.details("backend"))
    assert eng._slots["tiny-sdxl"].exported == {}


@pytest.mark.parametrize("plan", ["fp8+resident", "int8+model_offload"])
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_lossy_storage_plans_run_close_to_the_lossless_image(resident_images, model, plan):
    """fp8 layerwise-casting storage and torchao int8 weight-only, here with the CPU as the device (measured:
    37-57 dB against the fp32 image on these tiny models)."""
    from PIL import Image

    from engine.bench.quality import psnr

    eng = Engine(device="cpu", memory_plan=plan, allow_lossy_memory=True)
    got = eng.generate(model=model, **ARGS)
    reference = [Image.fromarray(a.astype(np.uint8)) for a in resident_images[("O0", model)]]
    assert psnr(got.images, reference) > 30
    assert any(line.startswith(f"storage {plan.split('+')[0]}") for line in eng.optimization_report(model).memory_plan)


def test_cli_generate_takes_the_memory_flags(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "img.png"
    code = main(["generate", "--model", "tiny-sdxl", "--prompt", "x", "--steps", "2", "--width", "64", "--height",
                 "64", "--out", str(out), "--memory-plan", "model_offload", "--max-loaded-models", "1", "--verbose"])
    assert code == 0 and out.is_file()
    assert "memory plan: model_offload" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny-sdxl", "--prompt", "x", "--out", str(out), "--max-memory", "lots"]) == 2
    assert "max_memory" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-sdxl", "--prompt", "x", "--out", str(out), "--max-memory", "1MB"]) == 2
    assert "needs" in capsys.readouterr().err  # no plan fits: the error names the budget needed


def test_lora_on_weights_it_cannot_wrap_is_a_clear_422(tmp_path):
    """fp8 storage (layerwise casting) and the compiler's torchao quantization leave no float weights for PEFT;
    int8 storage of a memory plan still takes adapters."""
    from engine.testing import random_lora

    lora = [{"path": str(random_lora("tiny-sdxl", tmp_path / "lora.safetensors")), "scale": 1.0}]
    fp8 = Engine(device="cpu", memory_plan="fp8+resident", allow_lossy_memory=True)
    with pytest.raises(InvalidRequestError, match="fp8") as e:
        fp8.generate(model="tiny-sdxl", loras=lora, **ARGS)
    assert e.value.http_status == 422 and e.value.field == "loras"
    quantized = Engine(device="cpu", compile_config={"quant": "int8_weight_only"})
    with pytest.raises(InvalidRequestError, match="quant"):
        quantized.generate(model="tiny-sdxl", loras=lora, **ARGS)
    assert quantized.generate(model="tiny-sdxl", **ARGS).images  # still usable
    int8 = Engine(device="cpu", memory_plan="int8+resident", allow_lossy_memory=True)
    plain = _pixels(int8.generate(model="tiny-sdxl", **ARGS))
    assert not np.array_equal(_pixels(int8.generate(model="tiny-sdxl", loras=lora, **ARGS)), plain)


def test_group_offload_composes_with_regional_compile(resident_images):
    """O2 with an offloading plan: the offload hooks wrap the modules before compile, blocks compile regionally (as
    diffusers documents for group offload), and the image stays the fp32 one within compile's rounding."""
    from conftest import images_close

    eng = Engine(device="cpu", opt_level="O2", memory_plan="group_offload", compile_config={"dtype": "fp32"})
    got = eng.generate(model="tiny-flux", **ARGS)
    report = eng.optimization_report("tiny-flux")
    assert report.status("compile") == "applied" and "blocks" in report.details("compile")[0]
    assert any(line.startswith("placement group_offload") for line in report.memory_plan)
    reference = [a.astype(np.uint8) for a in resident_images[("O0", "tiny-flux")]]
    ok, share = images_close(got.images, reference, levels=2, fraction=0.99)
    assert ok, share


@pytest.mark.parametrize("plan", ["text_encoders_offloaded", "group_offload"])
def test_lora_under_an_offloading_plan_keeps_the_placement(tmp_path, plan):
    """diffusers' LoRA loaders take accelerate hooks off and put their own model offload on: the engine's placement
    comes off before adapters change and goes back after, so the image equals the resident one with the LoRA."""
    from engine.runtime.placement import reset_placement  # noqa: F401  (the mechanism under test)
    from engine.testing import random_lora

    lora = [{"path": str(random_lora("tiny-sdxl", tmp_path / "lora.safetensors")), "scale": 0.8}]
    expected = _pixels(Engine(device="cpu").generate(model="tiny-sdxl", loras=lora, **ARGS))
    eng = Engine(device="cpu", memory_plan=plan)
    base = _pixels(eng.generate(model="tiny-sdxl", **ARGS))
    for _ in range(4):  # also past lora_fuse_after (3): offloaded weights are never merged into
        assert np.array_equal(_pixels(eng.generate(model="tiny-sdxl", loras=lora, **ARGS)), expected)
    components = eng._slots["tiny-sdxl"].loaded.components
    hooked = [n for n, m in components.items() if isinstance(m, torch.nn.Module)
              and (hasattr(m, "_hf_hook") or getattr(m, "_diffusers_hook", None) is not None)]
    assert sorted(hooked) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert not eng._slots["tiny-sdxl"].loras.fused
    eng.unload_loras("tiny-sdxl")
    assert np.array_equal(_pixels(eng.generate(model="tiny-sdxl", **ARGS)), base)


def test_detected_budget_evicts_the_least_recently_used_model(monkeypatch):
    """A detected budget is the free memory now, which loaded models already take from: a model that fits no plan
    beside them evicts the least recently used one and is planned again."""
    from engine.runtime import memory
    from engine.runtime.planner import Planner

    probe = Engine(device="cpu")
    peaks = {m: probe._slot(m).plan.peak_bytes for m in ("tiny-sdxl", "tiny-flux")}
    eng = Engine(device="cpu")
    total = max(peaks.values()) + 1024

    def budget(self, extra_bytes=0):  # what mem_get_info would say: the total minus the loaded models' weights
        used = sum(s.plan.resident_bytes for s in eng._slots.values())
        return memory.MemoryBudget(total - used + extra_bytes, None, "cpu", "detected")

    monkeypatch.setattr(Planner, "budget", budget)
    eng.load("tiny-sdxl")
    eng.load("tiny-flux")
    assert eng.loaded_models() == ["tiny-flux"]


def test_out_of_memory_while_placing_steps_down_at_load(monkeypatch, resident_images):
    from engine.runtime.planner import Planner

    original = Planner.place
    failures = []

    def place(self, components, family, plan):
        if plan.rung == "resident" and not failures:
            failures.append(plan.rung)
            raise torch.OutOfMemoryError("CUDA out of memory (injected while placing)")
        return original(self, components, family, plan)

    monkeypatch.setattr(Planner, "place", place)
    eng = Engine(device="cpu", memory_plan="resident")
    got = eng.generate(model="tiny-flux", **ARGS)
    assert failures == ["resident"] and eng._slots["tiny-flux"].plan.rung == "text_encoders_offloaded"
    assert any(line.startswith("fallback at load: out of memory with resident")
               for line in eng.optimization_report("tiny-flux").memory_plan)
    assert np.array_equal(_pixels(got), resident_images[("O0", "tiny-flux")])


def test_a_recompile_limit_failure_reruns_the_job_eagerly():
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from engine.compiler.compile import CompileStats, run_compiled

    class Pipeline:
        def __init__(self):
            self.calls = 0
            self.run_context = type("Scope", (), {"stats": CompileStats(model="m", budget=8)})()

        def __call__(self, params, step_callback=None):
            self.calls += 1
            if self.calls == 1:
                raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")
            return "image"

    pipeline = Pipeline()
    assert run_compiled(pipeline, None, None) == "image" and pipeline.calls == 2
    assert pipeline.run_context.stats.exhausted


def test_loading_one_model_does_not_block_requests_for_another(monkeypatch):
    import threading
    import time as _time

    import engine.api as api

    eng = Engine(device="cpu")
    eng.load("tiny-sdxl")
    started, release = threading.Event(), threading.Event()
    real_load = api.load_model

    def slow_load(*args, **kwargs):
        started.set()
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(api, "load_model", slow_load)
    loader = threading.Thread(target=eng.load, args=("tiny-flux",))
    loader.start()
    assert started.wait(30)
    begin = _time.monotonic()
    assert eng.generate(model="tiny-sdxl", **ARGS).images  # while tiny-flux is still loading
    assert loader.is_alive() and _time.monotonic() - begin < 25
    release.set()
    loader.join(60)
    assert sorted(eng.loaded_models()) == ["tiny-flux", "tiny-sdxl"]
