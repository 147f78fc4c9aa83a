"""Compiler benchmark: engine optimization levels vs stock diffusers (fp32, eager), same weights, same process.

    python benchmarks/compiler_speed.py --models small-sdxl small-flux --size 512 --steps 20

For each model: stock diffusers first (the baseline), then each level. Each is warmed up (which pays compilation
for O2/O3, reported as "first image"), then timed; PSNR is against the stock images of the same seed. Finally the
restart figures: the first image of a fresh process with an empty artifact cache vs one that reuses it.
Results go to benchmarks/results/compiler_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def psnr(a, b) -> float:
    xa = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    xb = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(((xa - xb) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def stock_pipeline(model: str):
    import diffusers

    from engine.loading import load_model
    from engine.registry import get_spec

    spec = get_spec(model)
    folder = Path(load_model(model).source)
    cls = getattr(diffusers, spec.family_spec.stock_pipeline)
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


def time_runs(fn, runs: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


RESTART = """
import json, sys, time
t0 = time.perf_counter()
from engine import Engine
eng = Engine(device="cpu", opt_level=sys.argv[2])
t1 = time.perf_counter()
eng.generate(model=sys.argv[1], prompt="a lighthouse at dusk", num_inference_steps=2, seed=0,
             width=int(sys.argv[3]), height=int(sys.argv[3]))
t2 = time.perf_counter()
from engine.compiler.compile import compile_counters
print("RESULT" + json.dumps({"import_s": t1 - t0, "first_image_s": t2 - t1, **compile_counters()}))
"""


def restart(model: str, level: str, size: int, cache: str) -> dict:
    env = {**os.environ, "ENGINE_CACHE_DIR": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", RESTART, model, level, str(size)], env=env, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][0][6:])


def bench_model(model: str, args: argparse.Namespace) -> dict:
    from engine import Engine

    kw = dict(prompt="a lighthouse at dusk", num_inference_steps=args.steps, width=args.size, height=args.size,
              seed=7)
    pipe, spec = stock_pipeline(model)
    gs = spec.defaults.guidance_scale
    extra = {"max_sequence_length": spec.defaults.max_sequence_length} if spec.family == "flux" else {}

    def run_stock():
        return pipe(prompt=kw["prompt"], num_inference_steps=args.steps, width=args.size, height=args.size,
                    guidance_scale=gs, generator=torch.Generator("cpu").manual_seed(7), **extra).images

    print(f"[{model}] stock diffusers fp32 eager ...", flush=True)
    warm, _ = time_runs(run_stock, 1)
    times, ref = time_runs(run_stock, args.runs)
    rows = [{"preset": "diffusers fp32 eager", "first_image_s": warm[0], "median_s": statistics.median(times),
             "runs_s": times, "psnr_db": None, "speedup": 1.0}]
    base = rows[0]["median_s"]
    pipe = None  # free the stock pipeline before the engine loads its own copy
    for level in args.levels:
        print(f"[{model}] engine {level} ...", flush=True)
        overrides = {"cache_threshold": args.cache_threshold} if args.cache_threshold is not None else None
        eng = Engine(device="cpu", opt_level=level, compile_config=overrides)
        start = time.perf_counter()
        eng.load(model)
        load_s = time.perf_counter() - start
        gen = lambda: eng.generate(model=model, guidance_scale=gs, **kw, **extra)  # noqa: E731
        warm, _ = time_runs(gen, 1)
        times, res = time_runs(gen, args.runs)
        med = statistics.median(times)
        cached = overrides and eng.optimization_report(model).status("cache") == "applied"
        label = f"engine {level}" + (f" (cache_threshold {args.cache_threshold})" if cached else "")
        rows.append({"preset": label, "load_s": load_s, "first_image_s": warm[0], "median_s": med,
                     "runs_s": times, "psnr_db": psnr(ref, res.images), "speedup": base / med,
                     "stages": res.timings, "report": eng.optimization_report(model).as_dict()})
        eng.unload(model)
    result = {"model": model, "size": args.size, "steps": args.steps, "guidance_scale": gs, "rows": rows}
    if args.restart_level:
        with tempfile.TemporaryDirectory() as cache:
            print(f"[{model}] restart with a cold, then a warm artifact cache ({args.restart_level}) ...", flush=True)
            cold = restart(model, args.restart_level, args.size, cache)
            warm_cache = restart(model, args.restart_level, args.size, cache)
        result["restart"] = {"level": args.restart_level, "cold_cache": cold, "warm_cache": warm_cache}
    return result


def to_markdown(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "", f"Device: cpu ({os.cpu_count()} cores), torch {torch.__version__}", ""]
    for r in results:
        lines += [f"### {r['model']}: {r['size']}x{r['size']}, {r['steps']} steps, guidance {r['guidance_scale']}", "",
                  "| preset | first image (s) | median (s) | speed-up vs diffusers | PSNR vs diffusers (dB) |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            p = row["psnr_db"]
            ptxt = "baseline" if p is None else ("identical" if p == float("inf") else f"{p:.1f}")
            lines.append(f"| {row['preset']} | {row['first_image_s']:.1f} | {row['median_s']:.2f} | "
                         f"{row['speedup']:.2f}x | {ptxt} |")
        if "restart" in r:
            c, w = r["restart"]["cold_cache"], r["restart"]["warm_cache"]
            lines += ["", f"Restart ({r['restart']['level']}, 2 steps, new process): first image "
                      f"{c['first_image_s']:.1f} s with an empty artifact cache ({c['fxgraph_cache_miss']} graphs "
                      f"compiled), {w['first_image_s']:.1f} s reusing it ({w['fxgraph_cache_hit']} cache hits)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small-sdxl", "small-flux"])
    parser.add_argument("--levels", nargs="+", default=["O0", "O2", "O3"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-threshold", type=float,
                        help="step-cache threshold for the levels that cache (default: the level's, 0.08)")
    parser.add_argument("--restart-level", default="O2", help="level for the restart measurement ('' to skip)")
    parser.add_argument("--out", default="benchmarks/results/compiler_cpu")
    args = parser.parse_args()
    results = [bench_model(m, args) for m in args.models]
    command = "python " + " ".join(sys.argv)
    md = to_markdown(results, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"command": command, "results": results}, indent=2, default=str))
    print(md)


if __name__ == "__main__":
    main()
