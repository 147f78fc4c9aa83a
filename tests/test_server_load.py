"""Fault and load test against a real `engine serve` on loopback: 200 requests at concurrency 16 with random cancels,
clients that disconnect mid-stream and a few invalid bodies. Every accepted job reaches a final state, none is lost,
and the server stays healthy. Bounded in count and time; loopback only."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import free_port, start_server, stop_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

APP = "fal-ai/fast-sdxl"
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
REQUESTS, CONCURRENCY, DEADLINE_S = 200, 16, 300


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--state-dir", str(tmp / "state"),
            "--endpoint", f"{APP}=tiny-sdxl", "--preload", "--log-level", "warning"]
    proc = start_server(args, tmp / "server.log", f"{url}/health")
    yield url, proc, tmp / "server.log"
    stop_server(proc)


def _one(base_url: str, i: int, rng: random.Random) -> tuple[str, str | None]:
    """One client: ("invalid", None), ("stream", None), or (kind, request_id) of an accepted queue job."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        roll = rng.random()
        if roll < 0.05:  # an invalid body: refused before anything is queued
            r = http.post(f"/queue/{APP}", json={"prompt": 42, "num_inference_steps": "many"})
            assert r.status_code == 422, r.text
            return "invalid", None
        if roll < 0.15:  # a streaming client that goes away after the first event
            with http.stream("POST", f"/{APP}/stream", json={"prompt": f"stream {i}", "seed": i, **SMALL}) as r:
                assert r.status_code == 200
                next(r.iter_bytes(), None)
            return "stream", None
        r = http.post(f"/queue/{APP}", json={"prompt": f"job {i}", "seed": i, **SMALL})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        if roll < 0.35:  # cancel at once: before, while or after it runs
            c = http.put(f"/queue/{APP}/requests/{rid}/cancel")
            assert c.status_code in (202, 400), c.text
            return "cancelled", rid
        return "job", rid


def test_load_with_cancels_disconnects_and_invalid_bodies(base):
    base_url, proc, log = base
    rng = random.Random(1234)
    seeds = [rng.random() for _ in range(REQUESTS)]
    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(lambda i: _one(base_url, i, random.Random(seeds[i])), range(REQUESTS)))
    accepted = [(kind, rid) for kind, rid in outcomes if rid is not None]
    assert len(accepted) > REQUESTS // 2
    final: dict[str, dict] = {}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while len(final) < len(accepted) and time.monotonic() - start < DEADLINE_S:
            for kind, rid in accepted:
                if rid in final:
                    continue
                status = http.get(f"/queue/{APP}/requests/{rid}/status").json()
                if status["status"] == "COMPLETED":
                    final[rid] = status
            time.sleep(0.2)
        lost = [rid for _, rid in accepted if rid not in final]
        assert not lost, f"{len(lost)} accepted jobs never reached a final state"
        for kind, rid in accepted:
            result = http.get(f"/queue/{APP}/requests/{rid}")
            if kind == "job":
                assert final[rid]["error"] is None and result.status_code == 200, result.text
                assert result.json()["images"]
            else:  # cancelled before it finished, or it had already completed
                assert result.status_code in (200, 400, 499), result.text
        assert http.get("/health").status_code == 200
        assert http.post(f"/{APP}", json={"prompt": "after the storm", **SMALL}).json()["images"]
    assert proc.poll() is None
    assert "Traceback" not in log.read_text()
