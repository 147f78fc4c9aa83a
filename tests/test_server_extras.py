"""Acceptance for the rest of fal's client surface, against a real `engine serve` over TLS on tiny models: uploads
(`upload_file`, `upload_image`, a file URL as an input, the cap), status streaming (httpx-sse), realtime
(`realtime(..., use_jwt=False)` and with a token; expiry and scope), webhooks (`submit(..., webhook_url=...)` to a
receiver on loopback, signature checked) and the OpenAI images API (the official `openai` package).

How the official Python client is pointed at the server, as a user would: the run/queue hosts by FAL_RUN_HOST /
FAL_QUEUE_RUN_HOST, read once at import, and the REST/CDN hosts (uploads, realtime tokens), which are constants in
`fal_client.client`, by setting those constants. The fixture imports fal_client only when it runs (test_server.py
must import it first, after setting the variables, whatever the order) and sets all five constants (the values the
variables would give) for this module only.
A second way needs no constant at all: a client whose httpx transport sends rest.fal.ai to the server
(`test_upload_through_a_mounted_transport`).
"""

import base64
import hashlib
import importlib.util
import http.server
import io
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

if importlib.util.find_spec("fal_client") is None:
    pytest.skip("fal-client is not installed", allow_module_level=True)
trustme = pytest.importorskip("trustme")
httpx = pytest.importorskip("httpx")
httpx_sse = pytest.importorskip("httpx_sse")
openai = pytest.importorskip("openai")
pytest.importorskip("msgpack")
pytest.importorskip("websockets")
pytest.importorskip("uvicorn")

from serving import free_port, start_server, stop_server  # noqa: E402

from engine.runtime.webhooks import verify_signature  # noqa: E402

API_KEY = "extras-key"
PORT = free_port()
BASE = f"https://127.0.0.1:{PORT}"
MAX_UPLOAD = 200_000
ENDPOINTS = {"fal-ai/fast-sdxl": "tiny-sdxl", "fal-ai/fast-lightning-sdxl": "tiny-sdxl",
             "fal-ai/flux/schnell": "tiny-flux", "fal-ai/aura-sr": "tiny-aura-sr"}
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


def png_bytes(size=(16, 8), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def decode_url(url: str, http: httpx.Client) -> Image.Image:
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    response = http.get(url)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extras")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    args = ["--host", "127.0.0.1", "--port", str(PORT), "--ssl-certfile", str(cert_file), "--ssl-keyfile",
            str(key_file), "--api-key", API_KEY, "--device", "cpu", "--log-level", "warning",
            "--allow-private-urls",  # the webhook receiver is on loopback
            "--max-upload-bytes", str(MAX_UPLOAD), "--webhook-attempts", "3"]
    for app, model in ENDPOINTS.items():
        args += ["--endpoint", f"{app}={model}"]
    import fal_client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(ca_file))
        proc = start_server(args, tmp / "server.log", f"{BASE}/health")
        # what FAL_RUN_HOST=127.0.0.1:PORT and FAL_QUEUE_RUN_HOST=127.0.0.1:PORT/queue give at import, and the
        # REST/CDN constants (no variable reads them)
        for name, value in (("RUN_URL_FORMAT", f"{BASE}/"), ("QUEUE_URL_FORMAT", f"{BASE}/queue/"),
                            ("REALTIME_URL_FORMAT", f"wss://127.0.0.1:{PORT}/"), ("REST_URL", BASE),
                            ("CDN_URL", BASE)):
            mp.setattr(fal_client.client, name, value)
        http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=60,
                            headers={"Authorization": f"Key {API_KEY}"})
        try:
            yield type("S", (), {"fal": fal_client, "proc": proc, "http": http, "ca_file": ca_file, "log": tmp / "server.log",
                                 "client": fal_client.SyncClient(key=API_KEY)})
        finally:
            http.close()
            stop_server(proc)


# -- uploads ------------------------------------------------------------------------------------------------------
def test_upload_file_and_image_then_a_file_url_is_an_input(server, tmp_path):
    path = tmp_path / "input.png"
    path.write_bytes(png_bytes())
    url = server.client.upload_file(path)  # the CDN flow: storage token, then POST /files/upload
    assert url.startswith(f"{BASE}/files/")
    got = server.http.get(url)
    assert got.content == path.read_bytes() and got.headers["content-type"] == "image/png"
    image_url = server.client.upload_image(Image.new("RGB", (24, 16), (200, 0, 0)), format="png")
    assert decode_url(image_url, server.http).size == (24, 16)
    # Fetching it over the network would fail (GET /files needs the key); the server reads its own file instead.
    out = server.client.run("fal-ai/aura-sr", {"image_url": url, "seed": 1})
    assert decode_url(out["image"]["url"], server.http).size == (64, 32)
    anonymous = httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file)))
    assert anonymous.get(url).status_code == 401
    anonymous.close()


class RestToServer(httpx.BaseTransport):
    """Sends fal's REST host (rest.fal.ai) to the local server; everything else as usual."""

    def __init__(self, base: str, verify: ssl.SSLContext):
        self.target = httpx.URL(base)
        self.inner = httpx.HTTPTransport(verify=verify)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "rest.fal.ai":
            request.url = request.url.copy_with(scheme=self.target.scheme, host=self.target.host,
                                                port=self.target.port)
            request.headers["Host"] = self.target.netloc.decode()
        return self.inner.handle_request(request)


def test_upload_through_a_mounted_transport(server, monkeypatch, tmp_path):
    """No constant changed: a client whose transport routes rest.fal.ai, using the storage repository ("fal")."""
    from functools import cached_property

    fal_client = server.fal
    monkeypatch.setattr(fal_client.client, "REST_URL", "https://rest.fal.ai")
    verify = ssl.create_default_context(cafile=str(server.ca_file))

    class LocalClient(fal_client.SyncClient):
        @cached_property
        def _client(self) -> httpx.Client:
            return httpx.Client(transport=RestToServer(BASE, verify), headers={"Authorization": f"Key {API_KEY}"},
                                timeout=60, follow_redirects=True)

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(path, format="JPEG")
    url = LocalClient(key=API_KEY).upload_file(path, repository="fal", fallback_repository=[])
    assert url.startswith(f"{BASE}/files/") and server.http.get(url).content == path.read_bytes()


def test_upload_over_the_cap_is_refused_before_it_is_stored(server):
    def initiate():
        r = server.http.post(f"{BASE}/storage/upload/initiate", json={"content_type": "image/png",
                                                                       "file_name": "big.png"})
        assert r.status_code == 200
        return r.json()

    big = png_bytes() + b"\0" * (MAX_UPLOAD + 1)
    slot = initiate()
    r = server.http.put(slot["upload_url"], content=big)  # declared length over the cap: refused at once
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    sent = []

    def stream():
        for i in range(0, len(big), 16384):
            sent.append(16384)
            yield big[i:i + 16384]

    slot = initiate()
    try:
        r = server.http.put(slot["upload_url"], content=stream())  # no length: refused as it streams
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server answered and closed while the client was still sending: also a refusal
    assert server.http.get(slot["file_url"]).status_code == 404
    assert server.http.put(slot["upload_url"], content=png_bytes()).status_code == 404  # the slot is spent
    r = server.http.post(f"{BASE}/files/upload", content=b"#!/bin/sh\necho not an image\n",
                         headers={"Content-Type": "image/png"})
    assert r.status_code == 415


# -- status streaming ---------------------------------------------------------------------------------------------
def test_status_stream_events_end_at_completed(server):
    handle = server.client.submit("fal-ai/fast-sdxl", {"prompt": "x", "seed": 3, **SMALL, "num_inference_steps": 3})
    events = []
    with httpx_sse.connect_sse(server.http, "GET", f"{handle.status_url}/stream?logs=1") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            events.append(sse.json())
    assert events and events[-1]["status"] == "COMPLETED" and events[-1]["error"] is None
    assert events[-1]["metrics"]["inference_time"] > 0
    assert any(line["message"] == "step 3/3" for line in events[-1]["logs"])
    for event in events:
        assert event["request_id"] == handle.request_id and event["status_url"] == handle.status_url
        assert event["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        if event["status"] == "IN_QUEUE":
            assert isinstance(event["queue_position"], int)
    # a finished request: one event; without logs: null logs; unknown id: 404
    with httpx_sse.connect_sse(server.http, "GET", f"{handle.status_url}/stream") as source:
        (only,) = [sse.json() for sse in source.iter_sse()]
    assert only["status"] == "COMPLETED" and only["logs"] is None
    assert server.http.get(f"{BASE}/queue/fal-ai/fast-sdxl/requests/nope/status/stream").status_code == 404


# -- realtime -----------------------------------------------------------------------------------------------------
def _metric(server, name: str, app: str) -> float:
    prefix = f'{name}{{app="{app}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in server.http.get(f"{BASE}/metrics").text.splitlines()
               if line.startswith(prefix))


def test_realtime_with_key_header_several_frames(server):
    app = "fal-ai/fast-lightning-sdxl"
    jobs_before = _metric(server, "engine_jobs_completed_total", app)
    with server.client.realtime(app, use_jwt=False) as conn:
        for i in range(3):
            conn.send({"prompt": f"frame {i}", "seed": i, "image_size": {"width": 64, "height": 64},
                       "num_inference_steps": "1", "request_id": f"r{i}"})
            out = conn.recv()
            assert out["request_id"] == f"r{i}" and out["seed"] == i
            assert decode_url(out["images"][0]["url"], server.http).size == (64, 64)  # inline: a data URI
        conn.send({"prompt": "bad", "num_inference_steps": "3"})
        with pytest.raises(server.fal.client.RealtimeError) as info:
            conn.recv()
        assert info.value.error == "INVALID_REQUEST"
        conn.send({"prompt": "after an error", "image_size": {"width": 64, "height": 64},
                   "num_inference_steps": "1"})
        assert conn.recv()["prompt"] == "after an error"
    assert _metric(server, "engine_requests_total", app) >= 1  # counted as a realtime connection
    assert _metric(server, "engine_jobs_completed_total", app) == jobs_before  # frames skip the job queue
    server.client.run(app, {"prompt": "queued", "image_size": {"width": 64, "height": 64},
                            "num_inference_steps": "1"})
    assert _metric(server, "engine_jobs_completed_total", app) == jobs_before + 1  # (a queued request counts)


def test_realtime_with_a_token_and_its_expiry_and_scope(server):
    with server.client.realtime("fal-ai/flux/schnell") as conn:  # POST /tokens/, then ?fal_jwt_token=
        conn.send({"prompt": "tokened", **SMALL})
        assert decode_url(conn.recv()["images"][0]["url"], server.http).size == (64, 64)
    short = server.http.post(f"{BASE}/tokens/", json={"allowed_apps": ["flux"], "token_expiration": 1}).json()
    assert isinstance(short, str)
    from websockets.sync.client import connect

    def first_frame(path, token):
        with connect(f"wss://127.0.0.1:{PORT}/{path}/realtime?fal_jwt_token={token}") as ws:
            return json.loads(ws.recv(timeout=30))

    assert first_frame("fal-ai/fast-lightning-sdxl", short)["error"] == "Unauthorized"  # another app
    time.sleep(1.2)
    frame = first_frame("fal-ai/flux/schnell", short)
    assert frame["type"] == "x-fal-error" and "expired" in frame["reason"]
    anonymous = httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file)))
    assert anonymous.post(f"{BASE}/tokens/", json={"allowed_apps": ["flux"]}).status_code == 401
    anonymous.close()


# -- webhooks -----------------------------------------------------------------------------------------------------
def test_submit_with_webhook_to_a_loopback_receiver(server):
    received = []
    got = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(503 if len(received) == 1 else 200)  # the first try fails: retried
            self.send_header("Content-Length", "0")
            self.end_headers()
            if len(received) > 1:
                got.set()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        handle = server.client.submit("fal-ai/fast-sdxl", {"prompt": "hooked", "seed": 4, **SMALL}, webhook_url=url)
        result = handle.get()
        assert got.wait(30), "webhook not delivered"
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert len(received) == 2
    headers, body = received[-1]
    payload = json.loads(body)
    assert payload["request_id"] == handle.request_id and payload["status"] == "OK"
    assert payload["payload"] == result
    assert verify_signature(API_KEY, headers, body) and not verify_signature("other", headers, body)
    assert headers["X-Fal-Webhook-Request-Id"] == handle.request_id
    assert hashlib.sha256(received[0][1]).digest() == hashlib.sha256(body).digest()  # the same payload retried


# -- OpenAI images API --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oai(server):
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file)), timeout=120)
    yield openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, http_client=http, max_retries=0)
    http.close()


def test_openai_generate_b64_and_url(server, oai):
    out = oai.images.generate(model="fal-ai/fast-sdxl", prompt="a red cube", n=2, size="64x64",
                              response_format="b64_json", quality="hd", style="vivid",
                              extra_body={"num_inference_steps": 1, "seed": 5})
    assert len(out.data) == 2
    for item in out.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (64, 64) and image.format == "PNG"
    out = oai.images.generate(model="tiny-sd15", prompt="a blue cube", size="64x64", response_format="url",
                              extra_body={"num_inference_steps": 1})  # a registry id: runs on fal-ai/lora
    assert out.data[0].url.startswith(f"{BASE}/files/")
    assert decode_url(out.data[0].url, server.http).size == (64, 64)
    ids = [m.id for m in oai.models.list()]
    assert "fal-ai/fast-sdxl" in ids and "tiny-sd15" in ids


def test_openai_edit_image_to_image_and_inpainting(server, oai):
    from engine.requests import GenerateRequest

    if "image" not in GenerateRequest.model_fields:
        with pytest.raises(openai.APIStatusError) as info:
            oai.images.edit(model="fal-ai/fast-sdxl", image=("in.png", png_bytes((64, 64))), prompt="x")
        assert info.value.status_code == 501
        pytest.skip("image-to-image is not in this engine build (Engine.generate has no `image`)")
    source = png_bytes((100, 70), (200, 30, 30))
    out = oai.images.edit(model="fal-ai/fast-sdxl", image=("in.png", source, "image/png"), prompt="a red barn",
                          response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 3,
                                                                  "strength": 0.5})
    # no size: the input's, rounded down to SDXL's multiple of 8
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (96, 64)
    def edited(color):
        out = oai.images.edit(model="fal-ai/fast-sdxl", image=("in.png", png_bytes((64, 64), color), "image/png"),
                              prompt="same", response_format="b64_json",
                              extra_body={"num_inference_steps": 2, "seed": 3, "strength": 0.5})
        return base64.b64decode(out.data[0].b64_json)

    assert edited((255, 0, 0)) != edited((0, 0, 255))  # same seed and prompt: the input image decides
    mask = io.BytesIO()
    Image.new("L", (100, 70), 255).save(mask, format="PNG")
    out = oai.images.edit(model="tiny-sd15", image=("in.png", source, "image/png"),
                          mask=("mask.png", mask.getvalue(), "image/png"), prompt="a barn", n=2, size="64x64",
                          extra_body={"num_inference_steps": 2, "seed": 3})
    assert [decode_url(d.url, server.http).size for d in out.data] == [(64, 64), (64, 64)]


def test_openai_errors(server, oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.images.generate(model="fal-ai/fast-sdxl", prompt="x", size="63x64")
    assert info.value.body["param"].startswith("image_size")
    with pytest.raises(openai.NotFoundError):
        oai.images.generate(model="no-such-model", prompt="x")
    bad = openai.OpenAI(base_url=f"{BASE}/v1", api_key="wrong", max_retries=0,
                        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file))))
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="fal-ai/fast-sdxl", prompt="x")
    assert server.proc.poll() is None


# -- the official JS client ---------------------------------------------------------------------------------------
def _js_client_dir() -> Path | None:
    """@fal-ai/client 1.10.1 and ws, installed once with npm into the engine cache (None when npm is unavailable)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    root = Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine") / "js-fal-client"
    if not (root / "node_modules" / "@fal-ai" / "client").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--prefix", str(root), "--no-audit", "--no-fund",
                               "@fal-ai/client@1.10.1", "ws@8"], capture_output=True, timeout=300)
        if done.returncode != 0:
            return None
    return root


def test_official_js_client_streaming_blob_upload_and_realtime(server):
    """What the issue found missing with the JS client: `subscribe(..., {mode: "streaming"})`, a Blob input (uploaded
    through the storage routes first) and `fal.realtime.connect` (token, then the socket)."""
    root = _js_client_dir()
    if root is None:
        pytest.skip("node/npm or the npm registry is not available")
    script = Path(__file__).parent / "js" / "fal_js_client_check.cjs"
    env = {**os.environ, "NODE_PATH": str(root / "node_modules"), "NODE_EXTRA_CA_CERTS": str(server.ca_file)}
    done = subprocess.run(["node", str(script), BASE, API_KEY], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["streaming"]["width"] == 64 and out["streaming"]["updates"][-1] == "COMPLETED"
    assert out["blob"] == {"width": 64, "height": 32}
    assert out["upload"]["url"].startswith(f"{BASE}/files/")
    assert [r["seed"] for r in out["realtime"]] == [11, 12]
    assert all(r["url"].startswith("data:image/jpeg;base64") for r in out["realtime"])
    assert out["proxy"] == {"seed": 5, "url": f"{BASE}/files/"}


def test_proxy_path_maps_only_fals_hosts(server):
    r = server.http.post(f"{BASE}/fal/proxy", json={"prompt": "x", **SMALL},
                         headers={"x-fal-target-url": "https://fal.run/fal-ai/fast-sdxl"})
    assert r.status_code == 200 and r.json()["images"][0]["width"] == 64
    for target in ("https://example.com/fal-ai/fast-sdxl", "http://fal.run/fal-ai/fast-sdxl", "", "https://[::1"):
        r = server.http.post(f"{BASE}/fal/proxy", json={}, headers={"x-fal-target-url": target})
        assert r.status_code == 400, target
