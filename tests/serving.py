"""Starting and stopping a real `engine serve` subprocess on loopback for the server tests (bounded waits)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, health_url: str, timeout: float = 180) -> subprocess.Popen:
    """`python -m engine.cli serve ARGS`, output to `log`, returned once `health_url` answers 200."""
    import sys

    import httpx

    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", *args], stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    out.close()  # the child keeps its own handle
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def point_fal_client(mp: pytest.MonkeyPatch, host: str) -> None:
    """Aim the official Python client at `host` ("127.0.0.1:PORT", TLS) as `FAL_RUN_HOST=host` and
    `FAL_QUEUE_RUN_HOST=host/queue` would, set before its import. fal_client reads those once, when first imported,
    so in a full run (another module imported it first) the module's URL constants are patched instead; REST and CDN
    (storage) have no variable and point here too."""
    import fal_client

    for name, value in (("RUN_URL_FORMAT", f"https://{host}/"), ("QUEUE_URL_FORMAT", f"https://{host}/queue/"),
                        ("REALTIME_URL_FORMAT", f"wss://{host}/"), ("REST_URL", f"https://{host}"),
                        ("CDN_URL", f"https://{host}")):
        mp.setattr(fal_client.client, name, value)
