"""The benchmark harness: `engine bench --scale tiny --quick` end to end (stock fp32 and bf16 baselines, engine
presets), FLOPs against a hand count, a failing preset, the stock bf16 row's reason where bf16 is not native, the
shared result format, and every benchmarks/*.py entry point on tiny models with one run (the test-only fast mode).

The quick run goes through `python -m engine.bench.cli` in a subprocess (the same entry point `engine bench` uses),
with the test session's fresh cache, so it also pays building the tiny models and exporting the ONNX graphs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

QUICK_LIMIT_S = 600  # acceptance is < 3 min on an idle 2-core machine; the bound is generous for a shared one


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine.bench.cli", "bench", "--scale", "tiny", "--quick", "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nengine bench --scale tiny --quick: {elapsed:.1f} s")
    return {"out": out, "elapsed": elapsed, "stdout": proc.stdout,
            "result": json.loads((out / "bench.json").read_text())}


def _scenario(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["scenarios"] if s["name"] == name)


def _row(scenario: dict[str, Any], preset: str) -> dict[str, Any]:
    return next(r for r in scenario["rows"] if r["preset"] == preset)


def test_quick_run_finishes_and_writes_reports(quick_run: dict[str, Any]) -> None:
    assert quick_run["elapsed"] < QUICK_LIMIT_S
    out: Path = quick_run["out"]
    md = (out / "bench.md").read_text()
    assert md in quick_run["stdout"]  # the markdown table is printed too
    for text in ("| diffusers |", "| O0 |", "| O1 |", "few-step", "encode / denoise / decode", "FLOPs / image",
                 "util.", "PSNR dB", "SSIM", "Published reference jobs", "A6000: ~18 s (published",
                 "vs stock fp32 | vs stock bf16", "min–max (spread)"):
        assert text in md, text
    # The result files start with the command, then name the machine: CPU model, cores, native bf16, load.
    assert md.startswith("Command: `python -m engine.bench.cli bench --scale tiny --quick")
    machine = md.splitlines()[4]
    assert machine.startswith("Machine: ") and "cores" in machine and "native bf16: " in machine
    assert "load average" in machine and "→" in machine
    assert next(iter(quick_run["result"])) == "command"
    with Image.open(out / "bench.png") as png:
        assert png.size[0] > 500 and png.size[1] > 300
    assert (out / "images" / "sdxl" / "diffusers.png").is_file()


def test_quick_run_figures(quick_run: dict[str, Any]) -> None:
    result = quick_run["result"]
    env = result["environment"]
    assert env["torch"] and env["diffusers"] and env["device"] == "cpu" and "git_commit" in env
    assert {s["name"] for s in result["scenarios"]} == {"sd15", "sdxl", "flux", "aurasr"}
    assert result["peaks"]["fp32"]["flops_per_s"] > 0
    task_stages = {"text-to-image": {"encode", "denoise", "decode"}, "upscale": {"preprocess", "tiles", "stitch"}}
    for sc in result["scenarios"]:
        task = sc["job"]["task"]
        base = _row(sc, "aura-sr" if task == "upscale" else "diffusers")
        assert base["status"] == "ok" and base["kind"] == "stock" and base["dtype"] == "fp32"
        main_stage = "tiles" if task == "upscale" else "denoise"
        for row in (r for r in sc["rows"] if r["status"] == "ok"):
            assert row["timing"]["median_s"] > 0 and row["timing"]["p90_s"] >= row["timing"]["median_s"]
            assert set(row["stages_s"]) == task_stages[task] and row["stages_s"][main_stage] > 0
            assert row["load_s"] > 0 and row["first_image_s"] > 0 and row["memory"]["peak_bytes"] > 0
            assert row["flops_per_image"] > 0 and 0 < row["utilisation"] < 1.5
            assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_image"] / row["timing"]["median_s"])
            assert row["speedup"] > 0
        if task == "upscale":
            continue
        o0 = _row(sc, "O0")  # stock numerics: bit-identical images
        assert o0["status"] == "ok" and o0["identical"] and o0["ssim"] == pytest.approx(1.0)
        o1 = _row(sc, "O1")
        assert o1["status"] == "ok" and (o1["identical"] or o1["psnr_db"] > 25)
        few = _row(sc, "few-step")
        assert few["job"]["guidance_scale"] == 0.0 and few["job_differs"] and few["ssim_same_job"] is not None
        stages = next(iter(sc["flops"].values()))["stages"]
        assert all(stages[s] > 0 for s in ("encode", "denoise", "decode"))


def test_stock_bf16_row_beside_stock_fp32(quick_run: dict[str, Any]) -> None:
    """Stock diffusers in bf16 is a second baseline: where the CPU has native bf16 it runs, and every other row has a
    speed-up against it from the same run; where it has not, the row is there, skipped with the reason."""
    from engine.bench.env import native_bf16

    import torch

    native, _ = native_bf16(torch.device("cpu"))
    env = quick_run["result"]["environment"]
    assert env["native_bf16"] is native and env["cpu_model"] and env["load_average_start"] is not None
    for sc in quick_run["result"]["scenarios"]:
        bf16 = _row(sc, "aura-sr-bf16" if sc["job"]["task"] == "upscale" else "diffusers-bf16")
        assert bf16["kind"] == "stock"
        if not native:
            assert bf16["status"] == "skipped" and "native bf16" in bf16["reason"]
            continue
        assert bf16["status"] == "ok" and bf16["dtype"] == "bf16" and bf16["speedup_bf16"] == pytest.approx(1.0)
        base = _row(sc, "aura-sr" if sc["job"]["task"] == "upscale" else "diffusers")
        assert bf16["speedup"] == pytest.approx(base["timing"]["median_s"] / bf16["timing"]["median_s"])
        assert bf16["psnr_db"] > 25  # against the fp32 baseline, same seed
        for row in (r for r in sc["rows"] if r["status"] == "ok"):
            assert row["speedup_bf16"] == pytest.approx(bf16["timing"]["median_s"] / row["timing"]["median_s"])
            t = row["timing"]
            assert t["min_s"] <= t["median_s"] <= t["max_s"] and t["spread"] >= 0


def test_stock_bf16_is_skipped_with_the_reason_without_native_bf16(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.bench.env as env
    from engine.bench.cli import main

    monkeypatch.setattr(env, "native_bf16", lambda device: (False, "oneDNN bf16 not supported (test)"))
    scenario = tmp_path / "bf16.yaml"
    scenario.write_text(BF16_SCENARIO)
    out = tmp_path / "out"
    assert main(["bench", "--scenario", str(scenario), "--out", str(out), "--runs", "1", "--warmup", "0",
                 "--no-images", "--no-progress", "--no-flops"]) == 0
    result = json.loads((out / "bench.json").read_text())
    sc = result["scenarios"][0]
    row = _row(sc, "diffusers-bf16")
    assert row["status"] == "skipped" and "needs native bf16 (oneDNN bf16 not supported (test))" in row["reason"]
    assert _row(sc, "O0")["speedup_bf16"] is None and _row(sc, "O0")["speedup"] > 0
    assert "- diffusers-bf16: needs native bf16" in (out / "bench.md").read_text()
    assert result["environment"]["native_bf16"] is False


BF16_SCENARIO = """
name: bf16
description: the stock bf16 baseline
prompt: a red cube
seed: 3
guidance_scale: 7.5
scales:
  tiny: {model: tiny-sd15, width: 64, height: 64, steps: 1}
presets:
  - {name: O0, opt_level: O0}
  - {name: diffusers-bf16, stock: true, dtype: bf16, requires: [bf16]}
  - {name: diffusers, stock: true}
"""


def test_presets_filter_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.bench.cli import main
    from engine.bench.scenario import load_scenario

    scenario = tmp_path / "bf16.yaml"
    scenario.write_text(BF16_SCENARIO)
    sc = load_scenario(scenario, "tiny", only=["O0", "diffusers"])
    assert [p.name for p in sc.presets] == ["diffusers", "O0"]  # the fp32 baseline first
    assert [p.name for p in load_scenario(scenario, "tiny").presets] == ["diffusers", "diffusers-bf16", "O0"]
    assert main(["bench", "--scenario", str(scenario), "--presets", "O0,nope", "--out", str(tmp_path)]) == 2
    assert "no preset 'nope'" in capsys.readouterr().err
    twice = tmp_path / "twice.yaml"
    twice.write_text(BF16_SCENARIO + "  - {name: again, stock: true}\n")
    with pytest.raises(ValueError, match="at most one stock preset per dtype"):
        load_scenario(twice, "tiny")


def test_upscale_scenario_against_the_reference_package(quick_run: dict[str, Any]) -> None:
    """The reference aura-sr package is the baseline; O0 has its semantics (within one level: it truncates, we
    round); the tiles stage holds the network's FLOPs; shared style (which the reference cannot run) is compared with
    the engine's O0 run of the same job."""
    sc = _scenario(quick_run["result"], "aurasr")
    o0, shared = _row(sc, "O0"), _row(sc, "shared-style")
    assert o0["status"] == "ok" and not o0["job_differs"] and o0["psnr_db"] > 45 and o0["ssim"] > 0.99
    assert shared["status"] == "ok" and shared["job_differs"] and shared["job"]["shared_style"]
    assert shared["psnr_same_job_db"] is not None and shared["ssim_same_job"] is not None
    job = sc["job"]
    with Image.open(quick_run["out"] / "images" / "aurasr" / "O0.png") as img:
        assert img.size == (4 * job["width"], 4 * job["height"])
    count = next(iter(sc["flops"].values()))
    assert count["stages"]["tiles"] > 0.99 * count["total"]
    assert "preprocess / tiles / stitch (s)" in (quick_run["out"] / "bench.md").read_text()


def test_gpu_only_backend_is_skipped_with_reason(quick_run: dict[str, Any]) -> None:
    sdxl = _scenario(quick_run["result"], "sdxl")
    trt = _row(sdxl, "tensorrt")
    assert trt["status"] == "skipped" and "CUDA" in trt["reason"]
    assert f"- tensorrt: {trt['reason']}" in (quick_run["out"] / "bench.md").read_text()
    assert _row(sdxl, "diffusers")["status"] == "ok"  # the rest of the scenario ran


def _flux_linear_flops_by_hand(cfg: dict[str, Any], width: int, height: int, text_tokens: int) -> int:
    """2*M*K*N over every nn.Linear of one FLUX transformer forward (batch 1), from the architecture alone."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    c_in, c_out = cfg["in_channels"], (cfg["out_channels"] or cfg["in_channels"]) * cfg["patch_size"] ** 2
    s_img, s_txt = (width // 16) * (height // 16), text_tokens
    s = s_img + s_txt

    def lin(m: int, k: int, n: int) -> int:
        return 2 * m * k * n

    total = lin(s_img, c_in, d) + lin(s_txt, cfg["joint_attention_dim"], d)  # x_embedder, context_embedder
    embedders = 2 if cfg["guidance_embeds"] else 1  # timestep (+ guidance): 256 -> d -> d
    total += embedders * (lin(1, 256, d) + lin(1, d, d)) + lin(1, cfg["pooled_projection_dim"], d) + lin(1, d, d)
    per_dual = (2 * lin(1, d, 6 * d)  # norm1, norm1_context (adaLN modulation)
                + 4 * lin(s_img, d, d) + 4 * lin(s_txt, d, d)  # q, k, v, out on each stream
                + lin(s_img, d, 4 * d) + lin(s_img, 4 * d, d) + lin(s_txt, d, 4 * d) + lin(s_txt, 4 * d, d))  # MLPs
    per_single = lin(1, d, 3 * d) + lin(s, d, 4 * d) + 3 * lin(s, d, d) + lin(s, 5 * d, d)  # norm, mlp, qkv, proj_out
    total += cfg["num_layers"] * per_dual + cfg["num_single_layers"] * per_single
    return total + lin(1, d, 2 * d) + lin(s_img, d, c_out)  # norm_out, proj_out


def test_flop_count_matches_hand_count_of_flux_linear_layers(quick_run: dict[str, Any]) -> None:
    from engine.loading import load_model

    flux = _scenario(quick_run["result"], "flux")
    job = flux["job"]
    loaded = load_model(job["model"])
    cfg = dict(loaded.components["transformer"].config)
    by_hand = job["steps"] * _flux_linear_flops_by_hand(cfg, job["width"], job["height"],
                                                        loaded.spec.defaults.max_sequence_length)
    count = next(c for label, c in flux["flops"].items() if "flow_match" not in label)
    ops = count["by_module"]["FluxTransformer2DModel"]
    assert ops.get("addmm", 0) + ops.get("mm", 0) == by_hand
    # attention on the CPU (its SDPA kernel is not in torch's FLOP table) is counted too
    assert ops["_scaled_dot_product_flash_attention_for_cpu"] > 0


FAILING_SCENARIO = """
name: failing
description: presets that fail in different places, between two that work
prompt: a red cube
seed: 3
guidance_scale: 7.5
scales:
  tiny: {model: tiny-sd15, width: 64, height: 64, steps: 1}
presets:
  - {name: diffusers, stock: true}
  - {name: bad-level, opt_level: O9}
  - {name: wrong-scheduler, opt_level: O0, scheduler: flow_match_euler}
  - {name: tensorrt, opt_level: O0, compile_config: {backend: tensorrt}}
  - {name: O0, opt_level: O0}
"""


def test_failing_presets_are_skipped_and_the_run_completes(tmp_path: Path) -> None:
    from engine.bench.cli import main

    scenario = tmp_path / "failing.yaml"
    scenario.write_text(FAILING_SCENARIO)
    out = tmp_path / "out"
    assert main(["bench", "--scenario", str(scenario), "--out", str(out), "--runs", "1", "--warmup", "0",
                 "--no-images", "--no-progress", "--no-reference-count"]) == 0
    sc = json.loads((out / "bench.json").read_text())["scenarios"][0]
    status = {r["preset"]: (r["status"], r["reason"]) for r in sc["rows"]}
    assert status["diffusers"][0] == "ok" and status["O0"][0] == "ok"
    assert status["bad-level"][0] == "skipped" and "O9" in status["bad-level"][1]
    assert status["wrong-scheduler"][0] == "skipped" and "flow_match_euler" in status["wrong-scheduler"][1]
    assert status["tensorrt"][0] == "skipped" and "tensorrt" in status["tensorrt"][1]
    assert _row(sc, "O0")["identical"]
    md = (out / "bench.md").read_text()
    assert "Skipped:" in md and "- bad-level: " in md


def test_ssim_and_psnr() -> None:
    from engine.bench.quality import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ia, ib = [Image.fromarray(a)], [Image.fromarray(noisy)]
    assert psnr(ia, ia) == math.inf and ssim(ia, ia) == pytest.approx(1.0)
    mse = ((a.astype(float) - noisy.astype(float)) ** 2).mean()
    assert psnr(ia, ib) == pytest.approx(10 * math.log10(255**2 / mse))
    assert 0.0 < ssim(ia, ib) < ssim(ia, [Image.fromarray(np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8))]) < 1.0


def test_scenarios_resolve_for_each_scale() -> None:
    from engine.bench.scenario import load_scenario, scenario_paths

    paths = {p.stem: p for p in scenario_paths()}
    assert {"sd15", "sdxl", "flux"} <= set(paths)
    small = load_scenario(paths["flux"], "small")
    assert small.job.model == "small-flux" and small.presets[0].stock
    quick = load_scenario(paths["sdxl"], "tiny", quick=True)
    assert quick.job.steps == 2 and all(p.quick for p in quick.presets) and "O2" not in {p.name for p in quick.presets}
    few = next(p for p in quick.presets if p.name == "few-step")
    assert quick.job_for(few).steps == 2 and quick.job_for(few).scheduler == "euler_trailing"
    assert load_scenario(paths["sdxl"], "real", model="sdxl-turbo").job.model == "sdxl-turbo"
    with pytest.raises(ValueError, match="no 'small' scale"):
        load_scenario(paths["sd15"], "small")
    upscale = load_scenario(paths["aurasr"], "tiny", quick=True, steps=3)
    assert upscale.job.task == "upscale" and upscale.job.stages == ("preprocess", "tiles", "stitch")
    assert upscale.presets[0].stock and "overlapped" not in {p.name for p in upscale.presets}
    shared = next(p for p in upscale.presets if p.name == "shared-style")
    assert upscale.job_for(shared).shared_style and not upscale.job.shared_style
    assert upscale.job_for(shared).steps == upscale.job.steps  # steps mean nothing to an upscaler


def test_bad_scenarios_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.bench.cli import main

    assert main(["bench", "--scenario", "no-such-scenario", "--out", str(tmp_path)]) == 2
    assert "no scenario 'no-such-scenario'" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nscales:\n  tiny: {model: tiny-sd15, width: 64, height: 64}\n"
                    "presets:\n  - {name: O0, opt_levle: O0}\n")
    assert main(["bench", "--scenario", str(typo), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "scenario typo:" in err and "opt_levle" in err
    assert not (tmp_path / "bench.json").exists()


# -- image-conditioned modes ------------------------------------------------------------------------------------------

MODE_SCENARIOS = {"sdxl-img2img": "sdxl_img2img", "sdxl-inpaint": "sdxl_inpaint", "sdxl-controlnet": "sdxl_controlnet"}
MODE_CLASSES = {"sdxl-img2img": "StableDiffusionXLImg2ImgPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
                "sdxl-controlnet": "StableDiffusionXLControlNetPipeline"}


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-modes")
    argv = [sys.executable, "-m", "engine.bench.cli", "bench", "--scale", "tiny", "--quick", "--out", str(out),
            "--no-progress", "--no-reference-count", "--presets", "diffusers,diffusers-bf16,O0,O1"]
    for name in MODE_SCENARIOS.values():
        argv += ["--scenario", name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


@pytest.mark.parametrize("name", list(MODE_SCENARIOS))
def test_image_conditioned_modes_match_stock_at_o0(modes_run: dict[str, Any], name: str) -> None:
    """Each mode runs stock (the same diffusers class the engine composes) and the engine on the same request: O0
    reproduces stock fp32, O1 stays close, and the rows carry the speed-ups against both stock dtypes."""
    sc = _scenario(modes_run, name)
    assert sc["job"]["mode"] == name.split("-")[1] and MODE_CLASSES[name] in _row(sc, "diffusers")["description"]
    o0 = _row(sc, "O0")
    assert o0["status"] == "ok", o0["reason"]
    assert o0["identical"] or o0["psnr_db"] > 45
    o1 = _row(sc, "O1")
    assert o1["status"] == "ok" and (o1["identical"] or o1["psnr_db"] > 25)
    assert o0["speedup"] is not None and o0["flops_per_image"] > 0
    bf16 = _row(sc, "diffusers-bf16")
    if bf16["status"] == "ok":
        assert o0["speedup_bf16"] is not None and bf16["psnr_db"] > 25


def test_mode_inputs_are_deterministic_and_validated() -> None:
    from engine.bench.inputs import control_image, engine_inputs, init_image, mask_image
    from engine.bench.scenario import Job, load_scenario, scenario_paths

    job = Job(model="tiny-sdxl", width=96, height=64, seed=3, mode="inpaint", strength=0.6)
    assert np.array_equal(np.asarray(init_image(job)), np.asarray(init_image(job)))
    other = np.asarray(init_image(Job(model="tiny-sdxl", width=96, height=64, seed=4)))
    assert not np.array_equal(np.asarray(init_image(job)), other)  # drawn from the seed
    assert init_image(job).size == (96, 64) and np.asarray(init_image(job)).std() > 10  # a picture, not a flat fill
    mask = np.asarray(mask_image(job))
    assert mask[32, 48] == 255 and mask[0, 0] == 0 and (mask == 255).mean() == pytest.approx(0.25)
    edges = np.asarray(control_image(job))
    assert set(np.unique(edges)) == {0, 255}
    kw = engine_inputs(job)
    assert set(kw) == {"image", "strength", "mask_image"} and kw["strength"] == 0.6
    with pytest.raises(TypeError, match="mode must be one of"):
        Job(model="tiny-sdxl", width=64, height=64, mode="outpaint")
    with pytest.raises(TypeError, match="controlnet"):
        Job(model="tiny-sdxl", width=64, height=64, mode="controlnet")
    paths = {p.stem: p for p in scenario_paths(list(MODE_SCENARIOS.values()))}
    cn = load_scenario(paths["sdxl_controlnet"], "tiny", quick=True)
    assert cn.job.controlnet == "tiny-controlnet-sdxl" and cn.job.conditioning_scale == 0.5
    assert load_scenario(paths["sdxl_img2img"], "small").job.strength == 0.6
    with pytest.raises(ValueError, match="no 'small' scale"):
        load_scenario(paths["sdxl_controlnet"], "small")


# -- entry points and the shared result format ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--scale", "tiny", "--quick", "--runs", "1", "--warmup", "0", "--no-flops", "--no-images", "--no-progress",
        "--no-reference-count"]  # the test-only fast mode: tiny models, one run, no compiling


def _run_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}", *argv])
    try:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None)


@pytest.mark.parametrize("script, scenarios, presets", [
    ("compiler_speed.py", {"sdxl", "flux"}, {"diffusers", "diffusers-bf16", "O0", "O1"}),
    ("backends_speed.py", {"sdxl", "flux"}, {"diffusers", "diffusers-bf16", "O0", "onnxruntime", "tensorrt"}),
    ("fewstep_speed.py", {"sdxl"}, {"diffusers", "diffusers-bf16", "O1", "few-step"}),
    ("aurasr_speed.py", {"aurasr"}, {"aura-sr", "aura-sr-bf16", "O0", "O1", "shared-style"}),
])
def test_scenario_entry_points(script: str, scenarios: set[str], presets: set[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each script is `engine bench` with its arguments; the caller's (here the fast mode, --out) win."""
    _run_script(script, [*FAST, "--out", str(tmp_path)], monkeypatch)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["command"].startswith("python ") and f"benchmarks/{script} --scale tiny" in result["command"]
    assert "(= python -m engine.bench.cli bench --scale" in result["command"]
    assert {s["name"] for s in result["scenarios"]} == scenarios
    for sc in result["scenarios"]:
        assert {r["preset"] for r in sc["rows"]} <= presets
        assert any(r["kind"] == "stock" and r["dtype"] == "fp32" and r["status"] == "ok" for r in sc["rows"])
        assert all(r["timing"]["runs"] == 1 for r in sc["rows"] if r["status"] == "ok")
    assert (tmp_path / "bench.md").read_text().startswith(f"Command: `{result['command']}`")


def _measurement_result(out: Path) -> tuple[dict[str, Any], str]:
    result = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert next(iter(result)) == "command" and md.startswith(f"Command: `{result['command']}`")
    env = result["environment"]
    assert env["cpu_model"] and env["cpu_count"] and isinstance(env["native_bf16"], bool)
    assert env["load_average_start"] is not None and env["load_average_end"] is not None
    assert "Machine: " in md and "native bf16: " in md
    return result, md


def test_lora_swap_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "swap"
    _run_script("lora_swap.py", ["--runs", "1", "--out", str(out)], monkeypatch)
    result, md = _measurement_result(out)
    series = {s["name"]: s for s in result["series"]}
    swap = series["swap to the other LoRA + image (hot-swap)"]
    assert swap["timing"]["runs"] == 1 and swap["graphs compiled during the swaps"] == 0  # no recompilation
    assert series["no hot-swap: fresh compile with the other LoRA + image"]["timing"]["median_s"] > 0
    assert result["figures"]["fresh compile + image / hot-swap + image"] > 0
    assert "| swap to the other LoRA + image (hot-swap) |" in md


def test_server_latency_entry_point(tmp_path: Path) -> None:
    pytest.importorskip("fal_client")
    pytest.importorskip("trustme")
    out = tmp_path / "server"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server_latency.py"), "--requests", "2",
                           "--rounds", "1", "--warmup", "1", "--concurrency", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, _ = _measurement_result(out)
    series = {s["name"]: s for s in result["series"]}
    assert series["direct Engine.generate"]["timing"]["runs"] == 2
    assert series["served (fal client, TLS)"]["timing"]["runs"] == 2
    assert series["served (fal client, TLS)"]["concurrent"]["requests"] == 2  # 1 client x 2 requests
    assert result["command"].startswith("python ") and "server_latency.py --requests 2" in result["command"]


def test_measurements_summary_and_ratio(tmp_path: Path) -> None:
    from engine.bench.measurement import Measurements

    m = Measurements("unit", "python x.py --flag", runs=3)
    for t in (0.3, 0.1, 0.2):
        m.add("slow", t)
        m.add("fast", t / 2)
    assert m.ratio("slow / fast", "slow", "fast") == pytest.approx(2.0)
    timing = m.get("slow").timing
    assert timing["median_s"] == pytest.approx(0.2) and timing["spread"] == pytest.approx(1.0)
    m.write(tmp_path / "unit")
    result, md = _measurement_result(tmp_path / "unit")
    assert result["figures"] == {"slow / fast": pytest.approx(2.0)}
    assert "| slow | 200.0 ms | 100.0 ms–300.0 ms (100%) | 3 |" in md
