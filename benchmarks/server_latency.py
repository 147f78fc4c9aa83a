"""What the server adds: latency of `engine serve` driven by the official fal client (TLS, sync `run`) against a direct
`Engine.generate` on the same tiny model, and throughput with N concurrent clients.

    python benchmarks/server_latency.py --requests 200 --concurrency 8 [--json out.json]

Added latency is measured per request as (client wall time) - (the engine's own `timings.total` in the response): the
HTTP, TLS, JSON, queue hand-off, image encoding and file store, everything but the model. Needs fal-client and
trustme (dev dependencies). Runs offline on the tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 50) * 1e3, "p99_ms": pct(values, 99) * 1e3, "mean_ms": statistics.fmean(values) * 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(device="cpu")
    fields = dict(model=args.model, prompt="a lighthouse", width=args.size, height=args.size,
                  num_inference_steps=args.steps)
    for i in range(args.warmup):
        engine.generate(seed=i, **fields)
    walls = []
    for i in range(args.requests):
        start = time.perf_counter()
        engine.generate(seed=i, **fields)
        walls.append(time.perf_counter() - start)
    return {"latency": summary(walls), "throughput_rps": len(walls) / sum(walls)}


def start_server(args: argparse.Namespace, port: int, tmp: Path) -> tuple[subprocess.Popen, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file), "--device", "cpu", "--preload",
           "--endpoint", f"{args.app}={args.model}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    return proc, ca_file


def wait_ready(port: int, ca_file: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    import ssl

    import httpx

    ctx = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not come up")


def served(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    os.environ.update(FAL_RUN_HOST=f"127.0.0.1:{port}", FAL_QUEUE_RUN_HOST=f"127.0.0.1:{port}/queue",
                      FAL_KEY="bench")
    proc, ca_file = start_server(args, port, tmp)
    try:
        wait_ready(port, ca_file, proc)
        os.environ["SSL_CERT_FILE"] = str(ca_file)
        import fal_client  # reads the hosts now

        body = {"prompt": "a lighthouse", "image_size": {"width": args.size, "height": args.size},
                "num_inference_steps": args.steps}

        def one(seed: int) -> tuple[float, float]:
            start = time.perf_counter()
            out = fal_client.run(args.app, {**body, "seed": seed})
            return time.perf_counter() - start, out["timings"]["total"]

        for i in range(args.warmup):
            one(i)
        walls, overheads = [], []
        for i in range(args.requests):
            wall, inference = one(i)
            walls.append(wall)
            overheads.append(wall - inference)

        concurrent_walls: list[float] = []
        lock = threading.Lock()
        per_client = max(1, args.requests // args.concurrency)

        def client(k: int) -> None:
            for j in range(per_client):
                wall, _ = one(k * per_client + j)
                with lock:
                    concurrent_walls.append(wall)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        return {
            "latency": summary(walls),
            "added_latency": summary(overheads),
            "concurrent": {"clients": args.concurrency, "requests": len(concurrent_walls),
                           "throughput_rps": len(concurrent_walls) / elapsed, "latency": summary(concurrent_walls)},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="fal-ai/fast-sdxl")
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, the same for both sides (1: on a small shared CPU, OpenMP spinning "
                             "with 2+ threads makes tiny-model timings swing tenfold)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    report = {"config": vars(args), "direct": direct(args), "server": served(args)}
    d, s = report["direct"], report["server"]
    print(f"{args.model} {args.size}x{args.size}, {args.steps} step(s), {args.requests} requests")
    print(f"direct Engine.generate   p50 {d['latency']['p50_ms']:8.1f} ms  p99 {d['latency']['p99_ms']:8.1f} ms"
          f"  {d['throughput_rps']:.2f} req/s")
    print(f"server (fal client, TLS) p50 {s['latency']['p50_ms']:8.1f} ms  p99 {s['latency']['p99_ms']:8.1f} ms")
    a = s["added_latency"]
    print(f"added by the server      p50 {a['p50_ms']:8.1f} ms  p99 {a['p99_ms']:8.1f} ms"
          "  (wall - engine timings.total, per request)")
    c = s["concurrent"]
    print(f"{c['clients']} concurrent clients      {c['throughput_rps']:.2f} req/s over {c['requests']} requests"
          f"  (p50 {c['latency']['p50_ms']:.1f} ms, p99 {c['latency']['p99_ms']:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
