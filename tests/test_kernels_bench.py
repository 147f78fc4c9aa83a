"""benchmarks/kernel_speed.py: GPU-only figures, skipped with the reason elsewhere (and so in the GPU smoke JSON); its code
path runs end to end on small shapes under Triton's interpreter, where the kernels match the references."""

import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel module is imported (Triton reads it then)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_figures_are_gpu_only_and_the_smoke_json_says_so():
    bench = _load("bench_kernels_test", "kernel_speed.py")
    assert bench.run_kernel_benchmarks("cpu") == {"skipped": "kernel figures are GPU-only (device is cpu)"}
    smoke = _load("gpu_smoke_kernels_test", "gpu_smoke.py")
    assert smoke.kernel_figures(torch.device("cpu"), True) == {
        "skipped": "kernel figures are GPU-only (device is cpu)"}


def test_benchmark_runs_each_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    bench = _load("bench_kernels_test", "kernel_speed.py")
    one_each = list({s.kernel: s for s in bench.SHAPES}.values())
    result = bench.run_kernel_benchmarks("cpu", dtype=torch.float32, quick=True, iters=1, allow_interpreter=True,
                                         shapes=one_each)
    assert result["device"] == "cpu (interpreted)"
    rows = result["shapes"]
    assert {r["kernel"] for r in rows} == {"group_norm_silu", "layer_norm_modulate", "rms_norm_rope"}
    for r in rows:
        assert "error" not in r, r
        assert r["max_abs_diff"] < 1e-4, r
        assert r["kernel_ms"] > 0 and r["inductor_ms"] > 0 and r["eager_ms"] > 0
    assert "x induct" in bench.table(result)


def test_no_benchmark_script_shadows_a_package_diffusers_or_transformers_probe():
    """Running a script puts benchmarks/ first on sys.path: a file named like an optional package those libraries
    probe by find_spec (benchmarks/kernels.py was found as Hugging Face's `kernels`) breaks their import."""
    probed = set()
    for lib in ("diffusers", "transformers"):
        source = Path(importlib.util.find_spec(f"{lib}.utils.import_utils").origin).read_text()
        probed |= set(re.findall(r"_is_package_available\(\s*[\"']([\w.]+)[\"']", source))
    assert "kernels" in probed  # the probe list is read, not empty
    stems = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert stems and not stems & probed, stems & probed
