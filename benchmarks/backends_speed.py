"""Backend benchmark: onnxruntime (CPU provider) vs torch eager vs torch compiled, all fp32, same weights, one run.

    ENGINE_CACHE_DIR=$(mktemp -d) python benchmarks/backends_speed.py --model small-sdxl --size 512 --steps 4

Presets are O0 (fp32, stock numerics) plus one change each: nothing (torch eager); O2's compile settings only
(regional torch.compile of the UNet blocks and the VAE decoder, dynamic shapes); `backend="onnxruntime"` (UNet and
VAE decoder exported to ONNX, CPU execution provider). Each loads the model ("setup": includes the ONNX export, or
nothing for compile, which is lazy) and makes one image ("first image": includes torch.compile's compilation); then
`--runs` timed rounds go round-robin over the presets (a shared machine's load hits them alike); median per preset.
Agreement with torch eager: PSNR and the share of uint8 values within one level. With an empty ENGINE_CACHE_DIR the
export and compile costs are real; a reused cache shows them as cache hits in the report.
Results: benchmarks/results/backends_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.bench.quality import psnr

PRESETS: dict[str, dict[str, Any]] = {
    "torch eager": {},
    "torch compiled (O2 compile only)": {"compile": True, "compile_vae": True},
    "onnxruntime CPU": {"backend": "onnxruntime"},
}


def within_one_level(a: list, b: list) -> float:
    xa = np.stack([np.asarray(i, dtype=np.int16) for i in a])
    xb = np.stack([np.asarray(i, dtype=np.int16) for i in b])
    return float((np.abs(xa - xb) <= 1).mean())


def prepare(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Load (setup) and make the first image (warm-up: pays compilation) with one preset."""
    from engine import Engine

    print(f"[{name}] setup and first image ...", flush=True)
    eng = Engine(device="cpu", opt_level="O0", compile_config=overrides)
    start = time.perf_counter()
    eng.load(args.model)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    eng.generate(**request(args))
    first = time.perf_counter() - start
    return {"preset": name, "overrides": overrides, "engine": eng, "setup_s": setup, "first_image_s": first,
            "runs_s": []}


def request(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=args.model, prompt="a lighthouse at dusk", width=args.size, height=args.size,
                num_inference_steps=args.steps, seed=7)


def timed_rounds(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Round-robin over the presets, so load from other processes on a shared machine hits all of them alike."""
    for i in range(args.runs):
        for row in rows:
            print(f"[{row['preset']}] run {i + 1}/{args.runs} ...", flush=True)
            start = time.perf_counter()
            result = row["engine"].generate(**request(args))
            row["runs_s"].append(time.perf_counter() - start)
            row["stages"], row["images"] = result.timings, result.images
    for row in rows:
        eng = row.pop("engine")
        row["median_s"] = statistics.median(row["runs_s"])
        report = eng.optimization_report(args.model)
        row["report"] = [r for r in report.as_dict()["passes"] if r["status"] == "applied"]
        eng.unload(args.model)


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    device = (f"Device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}, "
              f"onnxruntime {_ort_version()}; model {args.model}, {args.size}x{args.size}, {args.steps} steps, "
              f"1 image (guidance: 2 UNet rows per step), fp32")
    header = ("| preset | setup (s) | first image (s) | best (s) | median (s) | speed-up vs eager (best) | "
              "PSNR vs eager (dB) | uint8 within 1 level |")
    lines = [f"Command: `{command}`", "", device, "", header, "|---|---|---|---|---|---|---|---|"]
    base = min(rows[0]["runs_s"])
    for r in rows:
        p = r["psnr_db"]
        ptxt = "baseline" if r is rows[0] else ("identical" if p == float("inf") else f"{p:.1f}")
        best = min(r["runs_s"])
        lines.append(f"| {r['preset']} | {r['setup_s']:.1f} | {r['first_image_s']:.1f} | {best:.2f} | "
                     f"{r['median_s']:.2f} | {base / best:.2f}x | {ptxt} | {r['within_1']:.4%} |")
    lines += ["", "Timed runs (s), round-robin: " + "; ".join(
        f"{r['preset']} {', '.join(f'{t:.1f}' for t in r['runs_s'])}" for r in rows),
        "On a machine shared with other jobs the best run is the steadier figure (load only adds time)."]
    lines += ["", "Backend lines of the reports:"]
    for r in rows:
        lines += [f"- {r['preset']}: {d['name']}: {d['detail']}" for d in r["report"]
                  if d["name"] in ("backend", "compile")]
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-sdxl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch (and onnxruntime) threads; 0: all cores")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", default="benchmarks/results/backends_cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [prepare(name, PRESETS[name], args) for name in args.presets]
    timed_rounds(rows, args)
    for r in rows:
        r["psnr_db"] = psnr(rows[0]["images"], r["images"])
        r["within_1"] = within_one_level(rows[0]["images"], r["images"])
    command = "python " + " ".join(sys.argv)
    md = to_markdown(rows, args, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(md)
    clean = [{k: v for k, v in r.items() if k != "images"} for r in rows]
    Path(args.out + ".json").write_text(json.dumps({"command": command, "rows": clean}, indent=2, default=str))
    print(md)


if __name__ == "__main__":
    main()
