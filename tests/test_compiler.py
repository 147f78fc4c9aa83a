"""The compiler: levels expand into explicit configs, passes report what they did, lossless passes keep O0's
output, lossy ones stay above a PSNR floor, compiled graphs survive resolution changes and process restarts."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import images_close
from engine import Engine, errors
from engine.compiler import CompileConfig, config_for_level, level_names
from engine.compiler.compile import compile_counters

ALL_PASSES = {"dtype", "fuse_qkv", "channels_last", "attention", "quant", "cache", "lora_slots", "kernels", "backend",
              "cuda_graphs", "compile", "prompt_cache", "parallel"}
KW = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=64, num_inference_steps=4,
          guidance_scale=5.0, seed=1)


def psnr(a, b) -> float:
    xa = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    xb = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(((xa - xb) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def reference():
    eng = Engine(device="cpu", opt_level="O0")
    return {m: eng.generate(model=m, **KW).images for m in ("tiny-sdxl", "tiny-flux")}


def test_levels_expand_into_explicit_fields():
    assert level_names() == ["O0", "O1", "O2", "O3"]
    o0, o1, o2, o3 = (config_for_level(n) for n in level_names())
    assert (o0.dtype, o0.compile, o0.fuse_qkv, o0.quant, o0.cache) == ("fp32", False, False, "none", "none")
    assert o1.dtype == "auto" and o1.fuse_qkv and o1.channels_last and not o1.compile
    assert o2.compile and o2.compile_vae and o2.cache == "none"
    assert o3.compile and o3.cache == "auto" and o3.quant == "auto"
    assert len({c.compute_hash() for c in (o0, o1, o2, o3)}) == 4
    assert config_for_level("O2").compute_hash() == config_for_level("O2").compute_hash()
    assert config_for_level("O2", compile=False).compile is False
    with pytest.raises(errors.InvalidRequestError, match="O7"):
        config_for_level("O7")
    with pytest.raises(errors.InvalidRequestError, match="dtype"):
        config_for_level("O0", dtype="fp12")


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3"])
def test_report_covers_every_pass_and_explains_skips(level):
    eng = Engine(device="cpu", opt_level=level)
    report = eng.optimization_report("tiny-sdxl")
    assert {r.name for r in report.results} == ALL_PASSES
    for r in report.results:
        assert r.detail, f"{r.name} has no explanation"
    if level in ("O2", "O3"):
        assert report.status("cuda_graphs") == "skipped" and "device is cpu" in report.details("cuda_graphs")[0]
        assert report.status("compile") == "applied"
    assert report.as_dict()["passes"][0]["name"] == "dtype"
    assert "optimization report" in str(report)


def test_gpu_only_options_are_skipped_with_reason_on_cpu():
    eng = Engine(device="cpu", compile_config={"quant": "fp8", "cuda_graphs": True, "attention": "flash"})
    report = eng.optimization_report("tiny-flux")
    assert report.status("quant") == "skipped" and "8.9" in report.details("quant")[0]
    assert report.status("cuda_graphs") == "skipped" and "device is cpu" in report.details("cuda_graphs")[0]
    # flash is unavailable here: the pass falls back to native SDPA and says why
    assert report.status("attention") == "applied" and "native" in report.details("attention")[0]
    assert eng.generate(model="tiny-flux", **KW).images


def test_auto_quant_leaves_cpu_weights_alone_and_says_why():
    """O3's quant="auto" on the CPU: torchao's int8 measured slower than bf16 here, so nothing is quantized (an
    explicit kind still is: test_quantization_psnr_floor)."""
    report = Engine(device="cpu", compile_config={"quant": "auto"}).optimization_report("tiny-sdxl")
    assert report.status("quant") == "skipped" and "int8 measured slower than bf16" in report.details("quant")[0]
    assert "benchmarks/results/quant_cpu.md" in report.details("quant")[0]


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_lossless_passes_keep_O0_output(reference, model):
    config = {"fuse_qkv": True, "channels_last": True, "attention": "auto", "prompt_cache_size": 8}
    eng = Engine(device="cpu", compile_config=config)
    first = eng.generate(model=model, **KW)
    ok, frac = images_close(reference[model], first.images)
    assert ok, frac
    report = eng.optimization_report(model)
    assert report.status("fuse_qkv") == "applied"
    assert report.status("channels_last") == "applied"
    assert report.status("prompt_cache") == "applied"
    if model == "tiny-flux":
        assert report.status("attention") == "applied"
    else:  # the UNet's attention calls SDPA directly: reported, not faked
        assert report.status("attention") == "skipped" and "SDPA" in report.details("attention")[0]
    cache = eng._slot(model).pipeline.prompt_cache
    again = eng.generate(model=model, **KW)
    assert cache.hits == 1 and images_close(first.images, again.images, levels=0, fraction=1.0)[0]


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_bf16_stays_within_tolerance(reference, model):
    """bf16 keeps ~3 significant digits; on these random-weight models it measured 44-49 dB. 35 dB is the floor:
    visually identical, and far above what a wrong cast (tens of levels off, < 25 dB) would give."""
    eng = Engine(device="cpu", compile_config={"dtype": "bf16"})
    got = eng.generate(model=model, **KW)
    assert eng.optimization_report(model).status("dtype") == "applied"
    assert psnr(reference[model], got.images) >= 35.0


@pytest.mark.parametrize("kind", ["int8_weight_only", "int8_dynamic"])
def test_quantization_psnr_floor(reference, kind):
    """int8 per-channel weights measured 52-60 dB here; the 35 dB floor catches broken scales (which give noise)."""
    pytest.importorskip("torchao")
    eng = Engine(device="cpu", compile_config={"quant": kind})
    got = eng.generate(model="tiny-flux", **KW)
    report = eng.optimization_report("tiny-flux")
    assert report.status("quant") == "applied" and kind in report.details("quant")[0]
    value = psnr(reference["tiny-flux"], got.images)
    assert 35.0 <= value < float("inf"), value


def test_step_cache_skips_blocks_and_keeps_psnr(reference):
    """First-block cache: with threshold 0.3 it reuses the remaining blocks on some steps (counted with a hook on
    the last block); 30 dB floor (measured ~57 dB on this model) since skipped steps are an approximation."""
    kw = {**KW, "num_inference_steps": 8}
    ref = Engine(device="cpu").generate(model="tiny-flux", **kw).images
    eng = Engine(device="cpu", compile_config={"cache": "first_block", "cache_threshold": 0.3})
    transformer = eng.load("tiny-flux").components["transformer"]
    calls = []
    # a submodule of the last block: the cache hook replaces the block's forward, so its own hooks still fire
    transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(lambda *a: calls.append(1))
    got = eng.generate(model="tiny-flux", **kw)
    assert eng.optimization_report("tiny-flux").status("cache") == "applied"
    assert 0 < len(calls) < 8, f"last block ran {len(calls)} times for 8 steps"
    value = psnr(ref, got.images)
    assert 30.0 <= value < float("inf"), value
    # state is reset between jobs: the same request gives the same image again
    assert images_close(got.images, eng.generate(model="tiny-flux", **kw).images, levels=0, fraction=1.0)[0]
    unet_eng = Engine(device="cpu", compile_config={"cache": "auto"})
    assert unet_eng.optimization_report("tiny-sdxl").status("cache") == "skipped"


def test_step_cache_composes_with_compile():
    """The cache's skip decision is a deliberate graph break (diffusers marks it torch.compiler.disable), so a
    cached denoiser compiles with fullgraph=False instead of failing; output stays close to the uncached one."""
    kw = {**KW, "num_inference_steps": 8}
    ref = Engine(device="cpu").generate(model="tiny-flux", **kw).images
    eng = Engine(device="cpu", compile_config={"cache": "first_block", "cache_threshold": 0.3, "compile": True})
    got = eng.generate(model="tiny-flux", **kw)
    report = eng.optimization_report("tiny-flux")
    assert report.status("cache") == "applied" and report.status("compile") == "applied"
    assert "fullgraph=False (the first_block cache decides eagerly)" in report.details("compile")[0]
    value = psnr(ref, got.images)
    assert 30.0 <= value < float("inf"), value


def test_compile_matches_eager_and_does_not_recompile_in_bucket(reference):
    eng = Engine(device="cpu", compile_config={"compile": True})
    got = eng.generate(model="tiny-flux", **KW)
    assert eng.optimization_report("tiny-flux").status("compile") == "applied"
    ok, frac = images_close(reference["tiny-flux"], got.images)
    assert ok, frac
    graphs = compile_counters()["unique_graphs"]
    assert graphs > 0
    eng.generate(model="tiny-flux", **{**KW, "width": 96, "height": 80})
    eng.generate(model="tiny-flux", **{**KW, "width": 128, "height": 64})
    assert compile_counters()["unique_graphs"] == graphs, "a resolution change recompiled"


def test_compiled_unet_and_vae_match_eager(reference):
    eng = Engine(device="cpu", compile_config={"compile": True, "compile_vae": True})
    got = eng.generate(model="tiny-sdxl", **KW)
    assert "vae decoder" in eng.optimization_report("tiny-sdxl").details("compile")[0]
    ok, frac = images_close(reference["tiny-sdxl"], got.images)
    assert ok, frac


def test_second_process_reuses_compiled_artifacts(tmp_path):
    script = textwrap.dedent("""
        import json
        from engine import Engine
        from engine.compiler.compile import compile_counters
        eng = Engine(device="cpu", compile_config={"compile": True})
        eng.generate(model="tiny-flux", prompt="x", width=64, height=64, num_inference_steps=1, seed=0)
        print("COUNTERS" + json.dumps(compile_counters()))
    """)
    env = {**os.environ, "ENGINE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def run():
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("COUNTERS")][0]
        return json.loads(line[len("COUNTERS"):])

    first, second = run(), run()
    assert first["fxgraph_cache_miss"] > 0
    assert second["fxgraph_cache_hit"] >= first["fxgraph_cache_miss"] and second["fxgraph_cache_miss"] == 0
    assert any((tmp_path / "cache" / "compiled").rglob("*")), "compiled artifacts were not under ENGINE_CACHE_DIR"


def test_per_model_override_reloads_with_new_config():
    eng = Engine(device="cpu", opt_level="O0")
    assert eng.optimization_report("tiny-sd15").status("fuse_qkv") == "skipped"
    eng.load("tiny-sd15", compile_config={"fuse_qkv": True})
    assert eng.optimization_report("tiny-sd15").status("fuse_qkv") == "applied"
    eng.load("tiny-sd15", opt_level="O1")
    assert eng.optimization_report("tiny-sd15").status("dtype") in ("applied", "skipped")
    assert isinstance(eng._slot("tiny-sd15").config, CompileConfig)
