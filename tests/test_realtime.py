"""Realtime: signed tokens (expiry, scope) and the websocket protocol on a bare app with a scripted engine call.

The official client's `realtime(app, use_jwt=False)` and `realtime(app)` (token) against `engine serve` on a tiny
model are in test_server_extras.py.
"""

import json
import threading
import time

import pytest

msgpack = pytest.importorskip("msgpack")
fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from engine.errors import InvalidRequestError, UnauthorizedError  # noqa: E402
from engine.server.tokens import TokenSigner, app_alias, parse_token_request  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_tokens_expire_are_scoped_and_cannot_be_forged():
    clock = Clock()
    signer = TokenSigner("server-key", clock=clock)
    token, claims = signer.issue("realtime", ["fast-lightning-sdxl"], ttl_s=120)
    assert signer.verify(token, "realtime", "fal-ai/fast-lightning-sdxl").token_id == claims.token_id
    with pytest.raises(UnauthorizedError, match="not valid for fal-ai/flux/schnell"):
        signer.verify(token, "realtime", "fal-ai/flux/schnell")
    with pytest.raises(UnauthorizedError, match="not valid for storage"):
        signer.verify(token, "storage")
    with pytest.raises(UnauthorizedError, match="invalid"):
        TokenSigner("other-key", clock=clock).verify(token, "realtime", "fal-ai/fast-lightning-sdxl")
    header, payload, sig = token.split(".")
    with pytest.raises(UnauthorizedError, match="invalid"):  # a payload edited to widen the scope
        import base64

        widened = base64.urlsafe_b64encode(json.dumps({"scope": "realtime", "apps": ["flux"], "iat": 0,
                                                       "exp": 9e12, "jti": "x"}).encode()).rstrip(b"=").decode()
        signer.verify(f"{header}.{widened}.{sig}", "realtime", "fal-ai/flux/schnell")
    clock.now += 119
    signer.verify(token, "realtime", "fal-ai/fast-lightning-sdxl")
    clock.now += 2
    with pytest.raises(UnauthorizedError, match="expired"):
        signer.verify(token, "realtime", "fal-ai/fast-lightning-sdxl")
    assert app_alias("fal-ai/flux/schnell") == "flux"
    assert signer.issue("realtime", ["fal-ai/flux/schnell"])[1].allows("fal-ai/flux/schnell")


def test_token_request_validation():
    assert parse_token_request({"allowed_apps": ["flux"], "token_expiration": 60}) == (["flux"], 60.0)
    for bad in ({"allowed_apps": []}, {"allowed_apps": "flux"}, {"allowed_apps": ["x"], "token_expiration": 0},
                {"allowed_apps": ["x"], "token_expiration": 10**6}, []):
        with pytest.raises(InvalidRequestError):
            parse_token_request(bad)


# -- the websocket on a bare app -----------------------------------------------------------------------------------
class Calls:
    """A scripted engine: `execute` takes `delay` seconds and answers the prompt it ran."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.ran = []
        self.lock = threading.Lock()

    def prepare(self, app_id, arguments, base_url):
        if not isinstance(arguments.get("prompt"), str):
            raise InvalidRequestError("prompt", "field required")
        return (app_id, arguments)

    def execute(self, call, ctx, base_url):
        time.sleep(self.delay)
        ctx.check()
        with self.lock:
            self.ran.append(call[1]["prompt"])
        return {"images": [{"url": "data:image/jpeg;base64,AAAA"}], "prompt": call[1]["prompt"],
                "sync_mode": call[1]["sync_mode"]}


def make_client(calls, requires_auth=True):
    from fastapi import FastAPI, WebSocket

    from engine.endpoints import AppNotFoundError
    from engine.server.realtime import RealtimeConfig, serve_realtime

    signer = TokenSigner("k")

    def known(path):
        if path.strip("/") not in ("fal-ai/fast-lightning-sdxl", "fal-ai/flux/schnell"):
            raise AppNotFoundError(f"no app {path!r}")
        return path.strip("/")

    config = RealtimeConfig(prepare=calls.prepare, execute=calls.execute, key_ok=lambda h: h == "Key k",
                            signer=signer, known=known, requires_auth=requires_auth)
    app = FastAPI()

    @app.websocket("/{app_path:path}/realtime")
    async def realtime(websocket: WebSocket, app_path: str):
        await serve_realtime(websocket, app_path, config)

    return TestClient(app), signer


def test_msgpack_and_json_frames_with_key_header():
    calls = Calls()
    client, _ = make_client(calls)
    with client.websocket_connect("/fal-ai/fast-lightning-sdxl/realtime", headers={"Authorization": "Key k"}) as ws:
        for i in range(3):
            ws.send_bytes(msgpack.packb({"prompt": f"p{i}", "request_id": f"r{i}"}))
            out = msgpack.unpackb(ws.receive_bytes())
            assert out["prompt"] == f"p{i}" and out["request_id"] == f"r{i}" and out["sync_mode"] is True
        ws.send_text(json.dumps({"prompt": "as json"}))
        assert json.loads(ws.receive_text())["prompt"] == "as json"
        ws.send_bytes(msgpack.packb({"num_images": 2}))  # invalid: an error frame, the connection stays
        error = json.loads(ws.receive_text())
        assert error["type"] == "x-fal-error" and error["error"] == "INVALID_REQUEST" and "prompt" in error["reason"]
        ws.send_bytes(b"\xc1 not msgpack")
        assert json.loads(ws.receive_text())["error"] == "INVALID_MESSAGE"
        ws.send_bytes(msgpack.packb({"prompt": "still open"}))
        assert msgpack.unpackb(ws.receive_bytes())["prompt"] == "still open"


def test_refusals_send_an_error_frame_then_close():
    client, signer = make_client(Calls())
    cases = [("/fal-ai/fast-lightning-sdxl/realtime", {}, "Unauthorized"),
             ("/fal-ai/fast-lightning-sdxl/realtime", {"Authorization": "Key wrong"}, "Unauthorized"),
             ("/fal-ai/fast-lightning-sdxl/realtime?fal_jwt_token=" + signer.issue("realtime", ["flux"])[0], {},
              "Unauthorized"),  # a token for another app
             ("/fal-ai/nope/realtime", {"Authorization": "Key k"}, "APP_NOT_FOUND"),
             ("/fal-ai/flux/schnell/realtime?max_buffering=99", {"Authorization": "Key k"}, "INVALID_REQUEST")]
    for path, headers, error in cases:
        with client.websocket_connect(path, headers=headers) as ws:
            frame = json.loads(ws.receive_text())
            assert frame["type"] == "x-fal-error" and frame["error"] == error, path
            assert (frame.get("status") == "error") == (error == "Unauthorized")
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_text()
            assert info.value.code == 1008
    token = signer.issue("realtime", ["flux"], ttl_s=60)[0]
    with client.websocket_connect(f"/fal-ai/flux/schnell/realtime?fal_jwt_token={token}") as ws:
        ws.send_bytes(msgpack.packb({"prompt": "with a token"}))
        assert msgpack.unpackb(ws.receive_bytes())["prompt"] == "with a token"


def test_newest_request_wins_when_several_queue_up():
    calls = Calls(delay=0.3)
    client, _ = make_client(calls)
    with client.websocket_connect("/fal-ai/flux/schnell/realtime", headers={"Authorization": "Key k"}) as ws:
        ws.send_bytes(msgpack.packb({"prompt": "first", "request_id": 1}))
        time.sleep(0.1)  # "first" is running; the next three wait and only the newest survives
        for i in (2, 3, 4):
            ws.send_bytes(msgpack.packb({"prompt": f"p{i}", "request_id": i}))
        answered = [msgpack.unpackb(ws.receive_bytes())["request_id"] for _ in range(2)]
    assert answered == [1, 4] and calls.ran == ["first", "p4"]
