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


def point_fal_client(mp: pytest.MonkeyPatch, host: str, key: str) -> None:
    """Aim the official Python client at `host` ("127.0.0.1:PORT", TLS) with `key`, as `FAL_RUN_HOST=host`,
    `FAL_QUEUE_RUN_HOST=host/queue` and `FAL_KEY=key` would. fal_client reads the hosts once, when first imported,
    so in a full run (another module imported it first) the module's URL constants are patched instead; REST and CDN
    (storage) have no variable and point here too. The key is read per call, but every such module sets it at import
    (collection imports them all before any test runs), so it is set again here for this module's tests. The
    module-level clients (`fal_client.run`, `submit`, ...) cache their key and their HTTP client (with the TLS CA
    it was made under) on first use: both are dropped for this module, so they are made again here."""
    import fal_client

    mp.setenv("FAL_KEY", key)
    for client in (fal_client.sync_client, fal_client.async_client):
        for cached in ("_auth", "_client", "_token_manager"):
            mp.delitem(vars(client), cached, raising=False)

    for name, value in (("RUN_URL_FORMAT", f"https://{host}/"), ("QUEUE_URL_FORMAT", f"https://{host}/queue/"),
                        ("REALTIME_URL_FORMAT", f"wss://{host}/"), ("REST_URL", f"https://{host}"),
                        ("CDN_URL", f"https://{host}")):
        mp.setattr(fal_client.client, name, value)
