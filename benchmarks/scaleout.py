"""Scale-out throughput and latency: 1 vs 2 Ray Serve replicas, batching off vs on, at several client concurrencies,
in one run on one local Ray cluster. Requests go through the ingress's job queue (a `FalService` over the
`RemoteEngine`, as `engine serve --replicas` runs them), on tiny or small (benchmark-width) models, offline.

    python benchmarks/scaleout.py [--models tiny-sd15,tiny-sdxl] [--concurrency 1,4,16] [--ray-cpus 2]
    python benchmarks/scaleout.py --models small-sdxl --size 128 --out benchmarks/results/scaleout_small

Writes benchmarks/results/scaleout.json and .md (the command, the CPU and the load average first). Needs the
[ray] extra. On a CPU host every replica shares the same cores: replicas show the queueing/dispatch overhead and
batching the gain of fewer, larger model calls; on a GPU cluster each replica has its own device."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ off the path: its kernels.py would shadow Hugging Face's `kernels` (which diffusers imports), here and
# in the Ray workers (Ray copies the driver's script directory onto their sys.path when the driver has it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

APP_FOR_FAMILY = {"sd15": "fal-ai/stable-diffusion-v1-5", "sdxl": "fal-ai/fast-sdxl", "flux": "fal-ai/flux/schnell"}


def app_for(model: str) -> str:
    """The fal app a model is served under here (by its registry family: tiny-*, small-* or a real id)."""
    from engine.registry import find_spec

    spec = find_spec(model)
    if spec is None or spec.family not in APP_FOR_FAMILY:
        raise SystemExit(f"{model}: not a registry model of family {'/'.join(APP_FOR_FAMILY)}")
    return APP_FOR_FAMILY[spec.family]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_level(service: Any, app: str, args: dict[str, Any], concurrency: int, requests: int,
              rounds: int) -> dict[str, Any]:
    """`rounds` timed passes of `requests` at `concurrency` after one warm-up: images/s as the median of the passes
    with their min-max spread; p50/p90 over every timed request."""
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        service.run(app, {**args, "prompt": f"a lighthouse {i}", "seed": i})
        latencies.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: every replica loads and runs the shape once
        list(pool.map(one, range(max(2, concurrency))))
    latencies.clear()
    throughputs: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        throughputs.append(requests / (time.perf_counter() - start))
    median = statistics.median(throughputs)
    return {"concurrency": concurrency, "requests": requests, "rounds": rounds, "images_per_s": median,
            "images_per_s_min": min(throughputs), "images_per_s_max": max(throughputs),
            "spread": (max(throughputs) - min(throughputs)) / median,
            "p50_ms": pct(latencies, 50) * 1e3, "p90_ms": pct(latencies, 90) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-sd15,tiny-sdxl")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per cell (images/s: their median)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaleout"))
    args = parser.parse_args()

    import torch

    from engine.bench.env import device_name
    from engine.runtime.queue import JobQueue, queue_for
    from engine.scaleout.batching import BatchConfig
    from engine.scaleout.serve import ScaleoutConfig, start_replicas, stop_replicas
    from engine.service import FalService

    command = "python benchmarks/scaleout.py " + shlex.join(sys.argv[1:])
    levels = [int(c) for c in args.concurrency.split(",")]
    models = args.models.split(",")
    apps = [app_for(m) for m in models]
    if len(set(apps)) != len(apps):  # one endpoint serves one model per run
        raise SystemExit(f"--models {args.models}: two models of one family share a fal app; run them separately")
    load_before = os.getloadavg()
    setups = [("1 replica", 1, None), ("2 replicas", 2, None),
              ("1 replica + batching", 1, BatchConfig(args.batch_size, args.batch_wait_ms / 1000)),
              ("2 replicas + batching", 2, BatchConfig(args.batch_size, args.batch_wait_ms / 1000))]
    rows: list[dict[str, Any]] = []
    try:
        for name, replicas, batching in setups:
            config = ScaleoutConfig(replicas=replicas, ray_cpus=args.ray_cpus, num_cpus=0.5, batching=batching,
                                    engine_kwargs={"device": "cpu"}, preload=tuple(models))
            remote = start_replicas(config)
            queue = queue_for(remote, lambda: JobQueue(name=remote.device, workers=config.in_flight))
            overrides = {app_for(m): m for m in models}
            with FalService(remote, endpoint_overrides=overrides, trusted=True, queue=queue) as service:
                for model in models:
                    call = {"image_size": {"width": args.size, "height": args.size},
                            "num_inference_steps": args.steps, "sync_mode": True}
                    for c in levels:
                        row = {"setup": name, "model": model, "replicas": replicas, "batching": batching is not None,
                               **run_level(service, app_for(model), call, c, max(8, 2 * c), args.rounds)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        stop_replicas()
    load_after = os.getloadavg()
    out = {"command": command, "cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(),
           "load_average_before": load_before,
           "load_average_after": load_after, "size": args.size, "steps": args.steps, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"`{command}`", "", f"CPU: {out['cpu']} ({out['cores']} cores, shared); load average before "
             f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}; "
             f"{args.size}x{args.size}, {args.steps} steps, Ray with {args.ray_cpus} CPUs; images/s: median of "
             f"{args.rounds} timed passes per cell (min-max, spread = (max - min) / median); p50/p90 over every timed "
             "request of the cell", "",
             "| model | setup | concurrency | images/s | min-max (spread) | p50 ms | p90 ms |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setup']} | {r['concurrency']} | {r['images_per_s']:.2f} | "
                     f"{r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f} ({r['spread']:.0%}) | "
                     f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
