"""Acceptance: `engine serve` as a subprocess over TLS (a trustme CA), driven by the unmodified official fal client.

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST once, at import, so the port is chosen and the variables are set
at the top of this module, before the import; in a full run another module may have imported it first, so the
fixture also patches the URL constants those variables set (`serving.point_fal_client`). SSL_CERT_FILE is read when the client builds its HTTP client (on first
use), so the server fixture sets it for this module only.
"""

import asyncio
import base64
import io
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from serving import free_port, point_fal_client


PORT = free_port()
API_KEY = "test-key-1"
os.environ["FAL_RUN_HOST"] = f"127.0.0.1:{PORT}"
os.environ["FAL_QUEUE_RUN_HOST"] = f"127.0.0.1:{PORT}/queue"
os.environ["FAL_KEY"] = API_KEY

fal_client = pytest.importorskip("fal_client")
trustme = pytest.importorskip("trustme")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import images_close  # noqa: E402


BASE = f"https://127.0.0.1:{PORT}"
# every app id on a tiny model; fal-ai/lora stays unpinned so its `model_name` picks the model
ENDPOINTS = {
    "fal-ai/fast-sdxl": "tiny-sdxl", "fal-ai/fast-lightning-sdxl": "tiny-sdxl",
    "fal-ai/stable-diffusion-v1-5": "tiny-sd15", "fal-ai/flux/dev": "tiny-flux", "fal-ai/flux/schnell": "tiny-flux",
    "fal-ai/aura-sr": "tiny-aura-sr",
}
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path, ca_file: Path):
        self.proc, self.log, self.ca_file = proc, log, ca_file
        self.http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=30,
                                 headers={"Authorization": f"Key {API_KEY}"})

    def alive(self) -> bool:
        return self.proc.poll() is None and self.http.get(f"{BASE}/health").status_code == 200

    def fetch_image(self, image_obj: dict) -> Image.Image:
        url = image_obj["url"]
        if url.startswith("data:"):
            return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        response = self.http.get(url)
        response.raise_for_status()
        assert len(response.content) == image_obj["file_size"]
        assert response.headers["content-type"] == image_obj["content_type"]
        return Image.open(io.BytesIO(response.content))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(PORT),
           "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file), "--api-key", API_KEY,
           "--device", "cpu", "--preload", "--log-level", "warning"]
    for app, model in ENDPOINTS.items():
        cmd += ["--endpoint", f"{app}={model}"]
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out, pytest.MonkeyPatch.context() as mp:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent)
        srv = Server(proc, log, ca_file)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                try:
                    if srv.http.get(f"{BASE}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not answer within 180 s:\n{log.read_text()[-4000:]}")
                time.sleep(0.25)
            mp.setenv("SSL_CERT_FILE", str(ca_file))  # the fal client's httpx reads it when it is first used
            point_fal_client(mp, f"127.0.0.1:{PORT}", API_KEY)  # also when another module imported fal_client first
            yield srv
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            srv.http.close()


# -- run ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("app, args, size", [
    ("fal-ai/fast-sdxl", {**SMALL, "image_size": {"width": 96, "height": 64}}, (96, 64)),
    ("fal-ai/fast-lightning-sdxl", {"image_size": {"width": 64, "height": 96}, "num_inference_steps": "1"}, (64, 96)),
    ("fal-ai/stable-diffusion-v1-5", {"width": 64, "height": 72, "num_inference_steps": 1}, (64, 72)),
    ("fal-ai/flux/dev", {**SMALL, "output_format": "png", "sync_mode": True}, (64, 64)),
    ("fal-ai/flux/schnell", {"image_size": {"width": 96, "height": 64}, "num_inference_steps": 1}, (96, 64)),
    ("fal-ai/lora", {"model_name": "tiny-sd15", "loras": [], **SMALL}, (64, 64)),
])
def test_run_every_app_images_decode_to_requested_size(server, app, args, size):
    out = fal_client.run(app, {"prompt": "a lighthouse", "seed": 7, **args})
    assert out["seed"] == 7 and out["prompt"] == "a lighthouse"
    assert out["has_nsfw_concepts"] == [None] and out["safety_checker"]["ran"] is False
    assert out["timings"]["inference"] > 0
    (image_obj,) = out["images"]
    assert (image_obj["width"], image_obj["height"]) == size
    assert image_obj["url"].startswith("data:" if args.get("sync_mode") else f"{BASE}/files/")
    assert server.fetch_image(image_obj).size == size


# -- queue ----------------------------------------------------------------------------------------------------------
def test_submit_status_iter_events_get_and_lookup_by_id(server):
    handle = fal_client.submit("fal-ai/flux/dev", {"prompt": "x", "seed": 3, **SMALL, "num_inference_steps": 2})
    assert handle.status_url.startswith(f"{BASE}/queue/") and handle.cancel_url.endswith("/cancel")
    first = handle.status(with_logs=True)
    assert isinstance(first, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    events = list(handle.iter_events(with_logs=True, interval=0.05))
    assert isinstance(events[-1], fal_client.Completed) and events[-1].error is None
    assert events[-1].metrics["inference_time"] > 0
    assert any(entry["message"] == "step 2/2" for entry in events[-1].logs)
    result = handle.get()
    assert server.fetch_image(result["images"][0]).size == (64, 64)
    # the client drops the sub-path (fal-ai/flux/dev -> fal-ai/flux): looked up by id
    status = fal_client.status("fal-ai/flux/dev", handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.Completed) and status.logs
    assert fal_client.result("fal-ai/flux/dev", handle.request_id) == result


def test_subscribe_with_queue_updates(server):
    updates, enqueued = [], []
    out = fal_client.subscribe("fal-ai/fast-sdxl", {"prompt": "x", "seed": 1, **SMALL}, with_logs=True,
                               on_enqueue=enqueued.append, on_queue_update=updates.append)
    assert len(enqueued) == 1 and updates and isinstance(updates[-1], fal_client.Completed)
    assert out["images"][0]["width"] == 64


def test_cancel_queued_then_running(server):
    slow = fal_client.submit("fal-ai/fast-sdxl", {"prompt": "slow", "seed": 1, **SMALL, "num_inference_steps": 50})
    queued = fal_client.submit("fal-ai/fast-sdxl", {"prompt": "queued", "seed": 1, **SMALL})
    status = queued.status()
    assert isinstance(status, fal_client.Queued) and status.position >= 0
    queued.cancel()
    final = queued.status(with_logs=True)
    assert isinstance(final, fal_client.Completed) and final.error_type == "cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        queued.get()
    assert info.value.error_type == "cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as info:  # too late to cancel now
        queued.cancel()
    assert info.value.status_code == 400
    slow.cancel()
    final = list(slow.iter_events(with_logs=True, interval=0.05))[-1]
    assert final.error_type == "cancelled"
    assert len([e for e in final.logs if e["message"].startswith("step ")]) < 50


def test_stream_sends_progress_before_result(server):
    events = list(fal_client.stream("fal-ai/fast-sdxl", {"prompt": "x", "seed": 2, **SMALL, "num_inference_steps": 2}))
    assert len(events) >= 2
    progress, result = events[:-1], events[-1]
    assert progress and all(e["type"] == "progress" for e in progress)
    assert progress[0]["step"] == 1 and progress[-1]["step"] == progress[-1]["num_steps"] == 2
    assert server.fetch_image(progress[0]["preview"]).mode == "RGB"
    assert server.fetch_image(result["images"][0]).size == (64, 64)


# -- errors and auth ------------------------------------------------------------------------------------------------
def test_invalid_arguments_are_422_with_field_details(server):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.run("fal-ai/fast-sdxl", {"prompt": "x", "num_images": 99})
    assert info.value.status_code == 422 and info.value.error_type == "invalid_request"
    assert info.value.message[0]["loc"] == ["body", "num_images"]
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.submit("fal-ai/flux/dev", {"prompt": "x", "image_size": {"width": 72, "height": 64}})
    assert info.value.status_code == 422 and info.value.message[0]["loc"] == ["body", "image_size", "width"]
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.run("fal-ai/fast-sdxl", {"image_size": "square"})  # prompt missing
    assert info.value.status_code == 422
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.run("fal-ai/no-such-app", {"prompt": "x"})
    assert info.value.status_code == 404
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.status("fal-ai/fast-sdxl", "00000000-no-such-request")
    assert info.value.status_code == 404 and info.value.error_type == "request_not_found"


def test_wrong_api_key_is_401_and_health_is_open(server):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.SyncClient(key="wrong-key").run("fal-ai/fast-sdxl", {"prompt": "x", **SMALL})
    assert info.value.status_code == 401
    anonymous = httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file)))
    assert anonymous.get(f"{BASE}/health").json()["status"] == "ok"
    assert anonymous.get(f"{BASE}/metrics").status_code == 401
    metrics = server.http.get(f"{BASE}/metrics").text
    assert 'engine_requests_total{app="fal-ai/fast-sdxl"' in metrics and "engine_queue_depth" in metrics
    assert "engine_request_latency_seconds_bucket" in metrics
    anonymous.close()


def test_uncached_hub_model_from_http_is_refused_and_server_keeps_serving(server):
    """HTTP callers are untrusted: a hub id that is not in the local cache is refused before queueing (hub downloads
    need --allow-hub-downloads); failing jobs themselves are covered in test_service.py."""
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.submit("fal-ai/lora", {"model_name": "nobody/no-such-model", "prompt": "x", **SMALL})
    assert info.value.status_code == 422 and "allow-hub-downloads" in str(info.value.message)
    assert fal_client.run("fal-ai/fast-sdxl", {"prompt": "still here", **SMALL})["images"]


def test_ssrf_webhook_to_the_server_itself_is_refused(server):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal_client.submit("fal-ai/fast-sdxl", {"prompt": "x", **SMALL}, webhook_url=f"{BASE}/health")
    assert info.value.status_code == 422 and info.value.message[0]["loc"] == ["body", "fal_webhook"]
    assert server.alive()


def test_ssrf_image_url_to_the_server_itself_is_refused(server):
    for url in (f"{BASE}/health", f"http://127.0.0.1:{PORT}/files/x.png", "http://169.254.169.254/latest/meta-data/",
                "file:///etc/passwd"):
        with pytest.raises(fal_client.FalClientHTTPError) as info:
            fal_client.run("fal-ai/aura-sr", {"image_url": url})
        assert info.value.status_code == 422, url
    assert server.alive()
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 200, 30)).save(buf, format="PNG")
    out = fal_client.run("fal-ai/aura-sr", {"image_url": fal_client.encode(buf.getvalue(), "image/png")})
    assert server.fetch_image(out["image"]).size == (64, 32)


# -- async ----------------------------------------------------------------------------------------------------------
def test_async_variants(server):
    async def main():
        ran = await fal_client.run_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 9, **SMALL})
        handle = await fal_client.submit_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 9, **SMALL})
        statuses = [s async for s in handle.iter_events(with_logs=True, interval=0.05)]
        got = await handle.get()
        updates = []
        subscribed = await fal_client.subscribe_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 9, **SMALL},
                                                      on_queue_update=updates.append)
        streamed = [e async for e in fal_client.stream_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 9, **SMALL})]
        status = await fal_client.status_async("fal-ai/fast-sdxl", handle.request_id)
        fetched = await fal_client.result_async("fal-ai/fast-sdxl", handle.request_id)
        return ran, statuses, got, subscribed, updates, streamed, status, fetched

    ran, statuses, got, subscribed, updates, streamed, status, fetched = asyncio.run(main())
    assert ran["seed"] == got["seed"] == subscribed["seed"] == streamed[-1]["seed"] == 9
    assert isinstance(statuses[-1], fal_client.Completed) and isinstance(updates[-1], fal_client.Completed)
    assert streamed[0]["type"] == "progress" and isinstance(status, fal_client.Completed) and fetched == got


# -- concurrency ----------------------------------------------------------------------------------------------------
def test_20_concurrent_submits_complete_and_match_direct_runs(server, engine):
    requests = [{"prompt": f"a small house number {i}", "seed": 100 + i, "format": "png", "sync_mode": True,
                 **SMALL} for i in range(20)]
    results: dict[int, tuple[str, dict]] = {}
    lock = threading.Lock()

    def worker(indices: list[int]) -> None:
        handles = [(i, fal_client.submit("fal-ai/fast-sdxl", requests[i])) for i in indices]
        for i, handle in handles:
            out = handle.get()
            with lock:
                results[i] = (handle.request_id, out)

    threads = [threading.Thread(target=worker, args=(list(range(k, 20, 4)),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert sorted(results) == list(range(20)), "requests lost"
    assert len({rid for rid, _ in results.values()}) == 20
    for i, (_, out) in sorted(results.items()):
        direct = engine.generate(model="tiny-sdxl", prompt=requests[i]["prompt"], seed=100 + i, width=64, height=64,
                                 num_inference_steps=1, guidance_scale=7.5, negative_prompt="")  # fal's default
        served = server.fetch_image(out["images"][0]).convert("RGB")
        ok, fraction = images_close([served], direct.images)
        assert ok, (i, fraction)
        assert out["seed"] == 100 + i
