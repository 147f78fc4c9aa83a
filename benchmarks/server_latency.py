"""What the server adds: latency of `engine serve` driven by the official fal client (TLS, sync `run`) against a direct
`Engine.generate` on the same tiny model, in the harness's terms (engine/bench/measurement.py: its timer, median and
spread, result format), and throughput with N concurrent clients.

    python benchmarks/server_latency.py [--requests 20] [--rounds 3] [--concurrency 4]
                                        [--out benchmarks/results/server_latency_cpu]

Added latency per request: (client wall time) - (the engine's own `timings.total` in the response): the HTTP, TLS,
JSON, queue hand-off, image encoding and file store, everything but the model. Rounds alternate direct and served
requests, so load from other work falls on both. Needs fal-client and trustme (dev dependencies); offline, tiny models.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.bench.measurement import Measurements, script_command

ROOT = Path(__file__).resolve().parent.parent
DIRECT, SERVED = "direct Engine.generate", "served (fal client, TLS)"
ADDED = "added by the server (wall - timings.total)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def fal_run(args: argparse.Namespace):
    import fal_client  # reads the hosts from the environment now

    body = {"prompt": "a lighthouse", "image_size": {"width": args.size, "height": args.size},
            "num_inference_steps": args.steps}

    def one(seed: int) -> tuple[float, float]:
        start = time.perf_counter()
        out = fal_client.run(args.app, {**body, "seed": seed})
        return time.perf_counter() - start, out["timings"]["total"]
    return one


def concurrent(one: Any, args: argparse.Namespace) -> dict[str, Any]:
    walls: list[float] = []
    lock = threading.Lock()
    per_client = max(1, args.requests // args.concurrency)

    def client(k: int) -> None:
        for j in range(per_client):
            wall, _ = one(10_000 + k * per_client + j)
            with lock:
                walls.append(wall)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": args.concurrency, "requests": len(walls),
            "throughput_rps": round(len(walls) / (time.perf_counter() - start), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="fal-ai/fast-sdxl")
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, the same for both sides (1: on a small shared CPU, OpenMP spinning "
                             "with 2+ threads makes tiny-model timings swing tenfold)")
    parser.add_argument("--out", default="benchmarks/results/server_latency_cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from engine import Engine

    torch.set_num_threads(args.threads)
    m = Measurements("What the server adds: engine serve + fal client vs Engine.generate",
                     script_command(sys.argv[1:] if argv is None else argv), runs=args.rounds)
    engine = Engine(device="cpu")
    fields = dict(model=args.model, prompt="a lighthouse", width=args.size, height=args.size,
                  num_inference_steps=args.steps)
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    os.environ.update(FAL_RUN_HOST=f"127.0.0.1:{port}", FAL_QUEUE_RUN_HOST=f"127.0.0.1:{port}/queue",
                      FAL_KEY="bench")
    proc, ca_file = start_server(args, port, tmp)
    try:
        wait_ready(port, ca_file, proc)
        os.environ["SSL_CERT_FILE"] = str(ca_file)
        one = fal_run(args)
        for i in range(args.warmup):
            engine.generate(seed=i, **fields)
            one(i)
        for r in range(args.rounds):
            for i in range(args.requests):
                seed = r * args.requests + i
                m.time(DIRECT, lambda: engine.generate(seed=seed, **fields))
                wall, inference = one(seed)
                m.add(SERVED, wall)
                m.add(ADDED, wall - inference)
        m.get(SERVED).extra["concurrent"] = concurrent(one, args)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        engine.close()
    m.notes.append(f"{args.model} {args.size}x{args.size}, {args.steps} step(s), {args.rounds} rounds x "
                   f"{args.requests} requests per side, {args.threads} torch thread(s) on both sides; each request "
                   "is one sample of its series")
    m.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
