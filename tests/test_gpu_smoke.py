"""benchmarks/gpu_smoke.py does not rot: its --quick CPU mode runs end to end (reference, a half-precision level with
a random LoRA, onnxruntime, TensorRT skipped with its reason), writes strict JSON, and exits non-zero exactly when a
case crashed or dropped in quality; the time budget skips cases with the reason."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run(tmp_path, capsys):
    pytest.importorskip("peft")
    smoke = _smoke()
    out = tmp_path / "smoke.json"
    rc = smoke.main(["--device", "cpu", "--quick", "--out", str(out), "--case-timeout-s", "240"])
    data = json.loads(out.read_text(encoding="utf-8"))  # strict JSON: no Infinity
    cases = {(c["model"], c["level"], c["backend"]): c for c in data["cases"]}
    assert set(cases) == {tuple(c) for c in smoke.QUICK}
    assert data["counts"]["crashed"] == 0, [c["reason"] for c in data["cases"] if c["status"] == "crashed"]
    assert rc == (1 if data["counts"]["failed"] else 0)
    trt = cases[("tiny-sdxl", "O2", "tensorrt")]
    assert trt["status"] == "skipped" and trt["reason"]
    ref = cases[("tiny-sdxl", "O0", "torch")]
    assert ref["status"] == "ok" and ref["lora"] == "applied" and len(ref["runs"]) == 6
    assert {(r["width"], r["height"]) for r in ref["runs"]} == {(64, 64), (128, 64), (64, 128)}
    assert all(r["psnr_db"] == "inf" for r in ref["runs"])  # the reference against itself
    assert ref["lora_effect_db"] is not None and ref["lora_effect_db"] < smoke.LORA_NO_EFFECT_DB
    o1 = cases[("tiny-sdxl", "O1", "torch")]
    assert o1["threshold_db"] == smoke.THRESHOLDS_DB["O1"] and all(r["psnr_db"] is not None for r in o1["runs"])
    ort = cases[("tiny-sdxl", "O0", "onnxruntime")]
    if ort["status"] != "skipped":
        assert ort["backend_used"] == "onnxruntime" and ort["lora"].startswith("refused")
        assert ort["min_psnr_db"] == "inf" or ort["min_psnr_db"] >= smoke.THRESHOLDS_DB["O0"]
    for c in data["cases"]:
        if c["status"] in ("ok", "failed"):
            assert c["recompiles"] is not None and c["cuda_graphs"] is False and c["total_s"] > 0
    cfg = data["cfg_parallel"]  # split onto the CPU twice: the unsplit image, and auto skipped with the reason
    assert cfg["status"] == "ok" and cfg["devices"] == ["cpu", "cpu"], cfg
    assert cfg["psnr_db"] == "inf" or cfg["psnr_db"] >= smoke.THRESHOLDS_DB["O0"]
    assert cfg["auto"]["status"] == "skipped" and cfg["auto"]["detail"]
    printed = capsys.readouterr().out
    assert "min PSNR" in printed and "recompiles" in printed and str(out) in printed


def test_budget_skips_cases_with_the_reason(tmp_path):
    smoke = _smoke()
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--quick", "--out", str(out), "--budget-s", "0"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["counts"]["skipped"] == len(smoke.QUICK)
    assert any("time budget of 0 s spent" in c["reason"] for c in data["cases"])


def test_judge_fails_a_quality_drop_and_a_lora_without_effect():
    smoke = _smoke()
    case = smoke.Case("tiny-sdxl", "O1", "torch", lora="applied", lora_effect_db=math.inf,
                      runs=[{"lora": False, "width": 64, "height": 64, "psnr_db": 12.0}])
    smoke.judge(case)
    assert case.status == "failed" and "PSNR 12.0 dB < 20 dB at 64x64" in case.reason
    assert "LoRA had no effect" in case.reason
    fine = smoke.Case("tiny-sdxl", "O0", "onnxruntime", runs=[{"lora": False, "width": 64, "height": 64,
                                                                "psnr_db": 80.0}])
    smoke.judge(fine)
    assert fine.status == "ok" and fine.min_psnr_db == 80.0
