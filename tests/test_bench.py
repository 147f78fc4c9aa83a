"""The benchmark harness: `engine bench --scale tiny --quick` end to end, FLOPs against a hand count, a failing preset.

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
                 "util.", "PSNR dB", "SSIM", "Published reference jobs", "A6000: ~18 s (published"):
        assert text in md, text
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
