"""FLUX context parallelism (diffusers' Ulysses) run for real on two CPU processes over gloo, started by torchrun:
`CompileConfig.parallel="ulysses"` (or "context") over the process group. Rank 0's image and its transformer output
equal a single-process engine's in fp32 (the attention is the same math, only split by heads across ranks). Measured:
transformer output max |diff| 4.8e-7, images within 1 level; O2 (regional compile of the blocks around the all-to-all)
also composes (same 4.8e-7, images equal) but compiles for ~75 s on two CPU ranks, so it is not run here.

Ring attention cannot run on CPU ranks with diffusers' backends (engine/scaleout/parallel.py, MISSING_KIND_REASONS):
its plan is refused with that reason, tested here on capabilities as `detect_caps` reports them under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from context_parallel_worker import KW, controlnet_request, transformer_inputs
from engine import Engine
from engine.compiler import CompileConfig
from engine.loading.tiny import ensure_tiny_model
from engine.scaleout.parallel import ParallelCaps, plan_parallel

WORKER = Path(__file__).with_name("context_parallel_worker.py")
CPU_RANKS = ParallelCaps("cpu", 0, attention_heads=2, distributed_ready=True, world_size=2)


@pytest.mark.parametrize("request_, caps, kind, words", [
    ("ulysses", CPU_RANKS, "context_ulysses", "Ulysses over 2 cpu ranks"),
    ("context", CPU_RANKS, "context_ulysses", "1 per rank"),  # ring cannot run on CPU: Ulysses where heads split
    ("ring", CPU_RANKS, "single", "_native_attention_forward_op raises on return_lse=True"),
    ("ulysses", ParallelCaps("cpu", 0, attention_heads=3, distributed_ready=True, world_size=2), "single",
     "3 heads do not split over 2 ranks"),
    ("context", ParallelCaps("cpu", 0, attention_heads=2), "single", "torchrun --nproc-per-node"),
    ("context", ParallelCaps("cuda", 8, nvlink=True, attention_heads=24, distributed_ready=True, world_size=4),
     "context_ulysses", "over 4 cuda ranks"),
    ("context", ParallelCaps("cuda", 4, attention_heads=24, distributed_ready=True, world_size=4), "context_ring",
     "ring attention over 4 cuda ranks"),
    ("ring", ParallelCaps("cuda", 4, nvlink=True, attention_heads=24, distributed_ready=True, world_size=4),
     "context_ring", "forced by parallel='ring'"),
])
def test_forced_context_plans(request_, caps, kind, words):
    plan = plan_parallel("flux", caps, request=request_)
    assert plan.kind == kind and words in plan.reason
    if kind != "single":
        assert plan.degree == caps.world_size and plan.config == {f"{kind[8:]}_degree": caps.world_size}


def test_forced_context_is_for_dits_and_auto_stays_single_on_cpu():
    plan = plan_parallel("sdxl", CPU_RANKS, request="context")
    assert plan.kind == "single" and "DiT families (flux), not sdxl" in plan.reason
    assert plan_parallel("flux", CPU_RANKS).kind == "single"  # "auto": CPU ranks only when asked for
    assert CompileConfig(parallel="ulysses").parallel == "ulysses"
    with pytest.raises(ValueError):
        CompileConfig(parallel="tensor")


def _run_ranks(target: Path | str, args: list[str], **env_vars: str) -> Any:
    """`torchrun --standalone --nproc-per-node 2` of a script (its report.json) or a module (its completed process),
    bounded so a stuck collective fails the test instead of hanging it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(WORKER.parent)]),
           "OMP_NUM_THREADS": "1", **env_vars}
    launch = [str(target)] if isinstance(target, Path) else ["-m", target]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launch, *args]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"two gloo ranks did not finish in 120 s: {str(e.stderr)[-2000:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((Path(args[1]) / "report.json").read_text()) if isinstance(target, Path) else done


@pytest.fixture(scope="module")
def single():
    """The single-process reference: the same engine, parallel off."""
    engine = Engine(device="cpu", opt_level="O0", compile_config={"parallel": "off"})
    loaded = engine.load("tiny-flux")
    image = np.stack([np.asarray(i) for i in engine.generate(model="tiny-flux", **KW).images])
    with torch.no_grad():
        direct = loaded.components["transformer"](**transformer_inputs())[0].numpy()
    controlled = np.stack([np.asarray(i) for i in engine.generate(model="tiny-flux", **controlnet_request()).images])
    return image, direct, controlled


def test_two_cpu_ranks_at_o1_reproduce_the_single_process_image(tmp_path, single):
    """O1 in fp32 (fused QKV, channels-last VAE) composes with the all-to-all: the O0 single-process image; so does a
    ControlNet request (its residuals are split like the image tokens)."""
    ensure_tiny_model("flux")  # built once here, not raced by the two ranks
    report = _run_ranks(WORKER, ["ulysses", str(tmp_path), "O1"])
    assert report["status"] == "applied" and report["world_size"] == 2, report
    assert "context_ulysses" in report["details"][0]
    image, direct = np.load(tmp_path / "image.npy"), np.load(tmp_path / "transformer.npy")
    ref_image, ref_direct, ref_controlled = single
    assert np.abs(direct - ref_direct).max() < 1e-5  # measured 4.8e-7 (reduction order)
    for got, ref in ((image, ref_image), (np.load(tmp_path / "controlnet.npy"), ref_controlled)):
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.int16) - ref.astype(np.int16)).max() <= 1  # measured 1 level
    assert np.abs(ref_controlled.astype(np.int16) - ref_image.astype(np.int16)).max() > 8  # the ControlNet acts


def test_the_cli_under_torchrun_writes_once_from_rank_0(tmp_path, tmp_path_factory, monkeypatch):
    """`torchrun --nproc-per-node 2 -m engine.cli generate --parallel context` (O0): one JSON document and one image,
    both from rank 0, equal to the single-process engine's. On an empty cache: rank 0 builds tiny-flux before the
    other rank loads it (another rank's transformers `save_pretrained` would write no weights)."""
    out = tmp_path / "out.png"
    cache = tmp_path_factory.mktemp("cold-cache")
    done = _run_ranks("engine.cli", ["generate", "--model", "tiny-flux", "--prompt", KW["prompt"], "--width", "64",
                                     "--height", "64", "--steps", "2", "--seed", str(KW["seed"]), "--device", "cpu",
                                     "--opt-level", "O0", "--parallel", "context", "--out", str(out), "--json"],
                      ENGINE_CACHE_DIR=str(cache))
    payload = json.loads(done.stdout)  # rank 1 printed nothing
    assert payload["paths"] == [str(out)] and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert "context_ulysses" in json.dumps(payload["report"])
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))  # the reference loads what rank 0 built (tiny tokenizers
    engine = Engine(device="cpu", opt_level="O0", compile_config={"parallel": "off"})  # are trained per build)
    reference = np.asarray(engine.generate(model="tiny-flux", **KW).images[0], dtype=np.int16)
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - reference).max() <= 1


def _pass_on_tiny_flux(config: CompileConfig):
    from engine.compiler import OptimizationReport
    from engine.compiler.context import PassContext
    from engine.compiler.parallel import apply_parallel_plan
    from engine.families import get_family
    from engine.loading import load_model

    report = OptimizationReport(config_hash="test", device="cpu")
    ctx = PassContext(components=load_model("tiny-flux").components, family=get_family("flux"),
                      device=torch.device("cpu"), config=config, report=report, state={})
    apply_parallel_plan(ctx)
    return report.status("parallel"), " ".join(report.details("parallel"))


def test_the_pass_without_a_process_group_says_how_to_start_one():
    status, why = _pass_on_tiny_flux(CompileConfig(parallel="ulysses"))
    assert status == "skipped" and "torchrun --nproc-per-node N" in why
    status, why = _pass_on_tiny_flux(CompileConfig(parallel="context", parallel_devices=("cpu", "cpu")))
    assert status == "skipped" and "choose one" in why


def test_the_pass_refuses_what_would_make_ranks_disagree():
    """First-block cache: each rank would decide from its own slice whether to skip blocks (a deadlock); the check
    runs before the process group is needed, so it is exercised here on simulated CPU ranks."""
    from engine.compiler import OptimizationReport
    from engine.compiler.context import PassContext
    from engine.compiler.parallel import apply_parallel_plan
    from engine.families import get_family
    from engine.loading import load_model

    for state, words in (({"cache": "first_block"}, "first-block cache"),
                         ({"backend": {"transformer": "onnxruntime"}}, "exported onnxruntime graph")):
        report = OptimizationReport(config_hash="test", device="cpu")
        ctx = PassContext(components=load_model("tiny-flux").components, family=get_family("flux"),
                          device=torch.device("cpu"), config=CompileConfig(parallel="ulysses"), report=report,
                          state={"parallel_caps": CPU_RANKS, **state})
        apply_parallel_plan(ctx)
        assert report.status("parallel") == "skipped" and words in report.details("parallel")[0]
        assert ctx.denoiser._parallel_config is None


def test_engine_serve_under_torchrun_is_refused_with_the_alternatives(monkeypatch, capsys, tmp_path):
    """Every torchrun rank would start its own server: `engine serve` says so and names what to use instead."""
    pytest.importorskip("uvicorn")
    from engine.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--port", "0", "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "--replicas" in err and "generate --parallel" in err
    assert not (tmp_path / "state").exists()  # refused before anything was opened
