"""Uploads: the file store's upload writer (caps, sniffing, expiry) and fal's storage routes on a bare app.

The official clients against a real `engine serve` (upload_file, upload_image, file_url as an input) are in
test_server_extras.py.
"""

import io
import json
import time

import pytest
from PIL import Image

from engine import net
from engine.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from engine.runtime.files import FileStore

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def png_bytes(size=(8, 6), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def leftovers(store: FileStore) -> list[str]:
    return sorted(p.name for p in store.uploads_dir.iterdir()) if store.uploads_dir.exists() else []


def test_writer_caps_while_streaming_and_keeps_nothing(tmp_path):
    store = FileStore(tmp_path, max_upload_bytes=1000)
    with pytest.raises(PayloadTooLargeError):
        store.begin_upload(store.new_upload_id(), declared_size=1001)  # refused before a byte is read
    assert leftovers(store) == []
    writer = store.begin_upload(store.new_upload_id())
    data = png_bytes() + b"\0" * 2000
    writer.write(data[:600])
    with pytest.raises(PayloadTooLargeError):
        writer.write(data[600:1200])  # the chunk that would pass the cap is not written
    assert leftovers(store) == []  # the part file is gone: nothing of the upload is kept
    store.close()


def test_writer_sniffs_content_not_the_declared_type(tmp_path):
    store = FileStore(tmp_path)
    writer = store.begin_upload(store.new_upload_id())
    with pytest.raises(UnsupportedMediaTypeError):
        writer.write(b"<html><script>alert(1)</script></html>" * 4)
    assert leftovers(store) == []
    uid = store.new_upload_id()
    writer = store.begin_upload(uid)
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    for i in range(0, len(jpeg.getvalue()), 5):  # tiny chunks: sniffed once 16 bytes are in
        writer.write(jpeg.getvalue()[i:i + 5])
    stored = writer.finish()
    assert stored.content_type == "image/jpeg" and store.get(uid).path.read_bytes() == jpeg.getvalue()
    store.close()


def test_total_cap_and_expiry_and_lifecycle(tmp_path):
    store = FileStore(tmp_path, ttl_s=60, max_upload_bytes=10_000, max_uploads_bytes=len(png_bytes()) * 2 + 10)
    ids = []
    for _ in range(2):
        uid = store.new_upload_id()
        w = store.begin_upload(uid)
        w.write(png_bytes())
        w.finish()
        ids.append(uid)
    w = store.begin_upload(store.new_upload_id())
    w.write(png_bytes())
    with pytest.raises(PayloadTooLargeError):
        w.finish()  # all uploads together would pass the total cap
    short = store.new_upload_id()
    w = FileStore(tmp_path / "b", ttl_s=60).begin_upload(short, ttl_s=0.3)  # at least 1 s
    w.write(png_bytes())
    w.finish()
    other = FileStore(tmp_path / "b", ttl_s=60)
    assert other.get(short) is not None
    time.sleep(1.2)
    assert other.get(short) is None  # expired by its own (shorter) life
    assert other.purge() == 1 and leftovers(other) == []
    assert store.get(ids[0]) is not None
    store.close()


def test_multipart_joins_parts_in_order(tmp_path):
    store = FileStore(tmp_path, max_upload_bytes=len(png_bytes()) + 5)
    data = png_bytes()
    uid = store.new_upload_id()
    mp = store.begin_multipart(uid)
    third = len(data) // 3
    chunks = [data[:third], data[third:2 * third], data[2 * third:]]
    etags = {n: mp.write_part(n, [chunks[n - 1]]) for n in (3, 1, 2)}  # out of order, as concurrent clients send
    assert all(e.startswith('"') for e in etags.values())
    stored = mp.complete([1, 2, 3])
    assert stored.path.read_bytes() == data and leftovers(store) == [stored.path.name]
    big = store.begin_multipart(store.new_upload_id())
    big.write_part(1, [data])
    with pytest.raises(PayloadTooLargeError):
        big.write_part(2, [b"\0" * 10])  # the parts together pass the per-file cap
    big.abort()
    assert leftovers(store) == [stored.path.name]
    store.close()


def test_read_local_only_for_own_urls_and_net_fetch_uses_it(tmp_path):
    store = FileStore(tmp_path)
    uid = store.new_upload_id()
    w = store.begin_upload(uid)
    w.write(png_bytes())
    w.finish()
    own = ["https://127.0.0.1:8443/"]
    assert store.read_local(f"https://127.0.0.1:8443/files/{uid}", own) == png_bytes()
    assert store.read_local(f"https://evil.example/files/{uid}", own) is None
    assert store.read_local(f"https://127.0.0.1:8443/files/{uid}?x=1", own) is None
    assert store.read_local("https://127.0.0.1:8443/files/../../etc/passwd", own) is None
    with net.local_urls(lambda url: store.read_local(url, own)):
        # loopback would be refused by the guard; the server's own file is read from disk instead
        assert net.fetch(f"https://127.0.0.1:8443/files/{uid}", field="image_url", max_bytes=10**6) == png_bytes()
        with pytest.raises(Exception) as info:
            net.fetch("https://127.0.0.1:8443/files/unknown-id-0123456789abcdef", field="image_url", max_bytes=10**6)
        assert "private" in str(info.value) or "loopback" in str(info.value)
    store.close()


# -- the routes on a bare app -----------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    from fastapi import FastAPI, Request, Security
    from fastapi.responses import JSONResponse
    from fastapi.security import APIKeyHeader

    from engine.errors import EngineError
    from engine.server.storage import add_storage_routes
    from engine.server.tokens import TokenSigner

    store = FileStore(tmp_path, ttl_s=60, max_upload_bytes=4096)
    app = FastAPI()
    header = APIKeyHeader(name="Authorization", auto_error=False)

    def key_ok(value):
        return value == "Key k"

    async def authorize(value=Security(header)):
        if not key_ok(value):
            raise EngineError("no")

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError):
        return JSONResponse(e.to_dict(), 401 if str(e) == "no" else e.http_status)

    add_storage_routes(app, store, TokenSigner("k"), [Security(authorize)], key_ok, True)

    @app.get("/files/{key}")
    async def get_file(key: str):
        stored = store.get(key)
        return JSONResponse({"size": stored.size, "type": stored.content_type}) if stored else JSONResponse({}, 404)

    with TestClient(app, base_url="https://testserver") as c:
        c.store = store
        yield c
    store.close()


def test_js_flow_initiate_put_and_single_use(client):
    assert client.post("/storage/upload/initiate", json={}).status_code == 401
    r = client.post("/storage/upload/initiate?storage_type=fal-cdn-v3", headers={"Authorization": "Key k"},
                    json={"content_type": "image/png", "file_name": "a.png"})
    assert r.status_code == 200
    upload_url, file_url = r.json()["upload_url"], r.json()["file_url"]
    assert file_url.startswith("https://testserver/files/") and upload_url.startswith("https://testserver/storage/")
    data = png_bytes()
    assert client.put(upload_url, content=data, headers={"Content-Type": "text/plain"}).status_code == 200
    assert client.get(file_url).json() == {"size": len(data), "type": "image/png"}  # sniffed, not declared
    assert client.put(upload_url, content=data).status_code == 404  # single use


def test_caps_and_sniffing_on_the_routes(client):
    def slot():
        return client.post("/storage/upload/initiate", headers={"Authorization": "Key k"},
                           json={"content_type": "image/png"}).json()

    s = slot()
    r = client.put(s["upload_url"], content=png_bytes() + b"\0" * 5000)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

    def chunks():
        yield png_bytes()
        for _ in range(10):
            yield b"\0" * 1000  # no Content-Length: refused as it streams

    s = slot()
    assert client.put(s["upload_url"], content=chunks()).status_code == 413
    s = slot()
    r = client.put(s["upload_url"], content=b"GIF-not-really" + b"x" * 20)
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type"
    assert client.get(s["file_url"]).status_code == 404
    assert leftovers(client.store) == []


def test_lifecycle_header_shortens_life(client):
    s = client.post("/storage/upload/initiate", headers={"Authorization": "Key k", "X-Fal-Object-Lifecycle":
                                                          json.dumps({"expiration_duration_seconds": 1})},
                    json={"content_type": "image/png"}).json()
    client.put(s["upload_url"], content=png_bytes())
    assert client.get(s["file_url"]).status_code == 200
    time.sleep(1.3)
    assert client.get(s["file_url"]).status_code == 404


def test_js_multipart_and_python_cdn_flows(client):
    r = client.post("/storage/upload/initiate-multipart", headers={"Authorization": "Key k"},
                    json={"content_type": "image/png", "file_name": "big.png"}).json()
    data = png_bytes()
    half = len(data) // 2
    parts = [client.put(f"{r['upload_url']}/{n}", content=chunk).json() for n, chunk in
             ((1, data[:half]), (2, data[half:]))]
    assert [p["partNumber"] for p in parts] == [1, 2]
    done = client.post(f"{r['upload_url']}/complete", json={"parts": parts})
    assert done.status_code == 200 and client.get(r["file_url"]).json()["size"] == len(data)
    # the Python client's CDN flow: a storage token, then POST /files/upload with it
    token = client.post("/storage/auth/token?storage_type=fal-cdn-v3", headers={"Authorization": "Key k"},
                        json={}).json()
    assert token["token_type"] == "Bearer" and token["base_url"] == "https://testserver"
    auth = {"Authorization": f"Bearer {token['token']}", "Content-Type": "image/png"}
    access = client.post("/files/upload", content=data, headers=auth).json()["access_url"]
    assert client.get(access).json()["size"] == len(data)
    assert client.post("/files/upload", content=data, headers={"Authorization": "Bearer forged.x.y"}).status_code == 401
    m = client.post("/files/upload/multipart", headers=auth).json()
    e1 = client.put(f"{m['access_url']}/multipart/{m['uploadId']}/1", content=data[:half], headers=auth)
    e2 = client.put(f"{m['access_url']}/multipart/{m['uploadId']}/2", content=data[half:], headers=auth)
    parts = [{"partNumber": 1, "etag": e1.headers["etag"]}, {"partNumber": 2, "etag": e2.headers["etag"]}]
    assert client.post(f"{m['access_url']}/multipart/{m['uploadId']}/complete", json={"parts": parts},
                       headers=auth).status_code == 200
    assert client.get(m["access_url"]).json()["size"] == len(data)


def test_a_queued_job_naming_an_upload_runs_again_after_a_restart(tmp_path):
    """A durable queue re-runs queued jobs at start; an input that names the server's own upload is read from the
    file store then too (never fetched: the base URL here does not even resolve)."""
    import threading

    from engine import Engine
    from engine.server.surface import local_inputs
    from engine.service import FalService

    overrides = {"fal-ai/aura-sr": "tiny-aura-sr"}
    state, base = tmp_path / "state", "https://engine.invalid/"
    eng = Engine(device="cpu")
    fal1 = FalService(eng, endpoint_overrides=overrides, state_dir=state, retention_s=600)
    uid = fal1.files.new_upload_id()
    writer = fal1.files.begin_upload(uid)
    writer.write(png_bytes((16, 8)))
    writer.finish()
    started = threading.Event()

    def blocker(ctx):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.01)

    fal1.queue.submit(blocker, app_id="blocker")
    assert started.wait(20)
    with local_inputs(fal1.files, [base]):
        call = fal1.prepare("fal-ai/aura-sr", {"image_url": f"{base}files/{uid}", "seed": 1})
    queued = fal1.enqueue(call, base_url=base)
    fal1.close(timeout=20)
    with FalService(eng, endpoint_overrides=overrides, state_dir=state, retention_s=600) as fal2:
        out = fal2.get_handle(queued.id).get(120)
        assert (out["image"]["width"], out["image"]["height"]) == (64, 32)
    eng.close()
