"""fal's realtime protocol: a websocket at `/{app_id}/realtime` (e.g. `/fal-ai/fast-lightning-sdxl/realtime`).

Authentication, at connect: `?fal_jwt_token=<token from POST /tokens/>` (signed, short-lived, scoped to the app),
or the key header `Authorization: Key <key>` (the Python client's `realtime(app, use_jwt=False)`). A refused
connection gets an error frame and a close (1008), so a client sees why; an auth refusal's frame is
`{"type": "x-fal-error", "status": "error", "error": "Unauthorized", "reason": ...}`, which the JS client reads as
"fetch a new token".

Frames: each client frame is one request's arguments, msgpack (binary, what fal's clients send by default) or JSON
(text). The answer goes back in the same encoding: the app's result JSON, with images inline (`sync_mode` defaults to
true here: data URIs, nothing written to the file store) and the request's `request_id` echoed when it sent one.
Errors are text frames `{"type": "x-fal-error", "error": <ERROR_TYPE>, "reason": <message>}`; the connection stays
open after a request's error. Frames that arrive while a request runs wait in a buffer of `max_buffering` (1..60,
default 1): when it overflows the oldest is dropped, so with the default the newest request wins.

Requests skip the job queue: each is validated (`prepare`), then run directly on the engine (its loaded, compiled
model; the device lock still serialises it with a queued job that is running) and rendered: one model call per
frame, which is what a few-step app (`fal-ai/fast-lightning-sdxl`, `fal-ai/flux/schnell`) needs to keep up.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..errors import EngineError, JobCancelledError, UnauthorizedError
from .tokens import TokenSigner

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_BUFFERING = (1, 60)
POLICY_VIOLATION = 1008
UNAUTHORIZED = "Unauthorized"  # the JS client matches this exact text (with status "error") to refresh its token


@dataclass
class Frame:
    arguments: Any
    binary: bool


def decode_frame(message: dict[str, Any]) -> Frame:
    """A websocket receive message -> the request's arguments (msgpack for binary frames, JSON for text)."""
    import msgpack

    data, text = message.get("bytes"), message.get("text")
    if data is not None:
        if len(data) > MAX_FRAME_BYTES:
            raise _FrameError("PAYLOAD_TOO_LARGE", f"frame larger than {MAX_FRAME_BYTES} bytes")
        try:
            return Frame(msgpack.unpackb(data, raw=False, strict_map_key=False), True)
        except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad input
            raise _FrameError("INVALID_MESSAGE", f"binary frames must be msgpack ({type(e).__name__})") from None
    try:
        return Frame(json.loads(text or ""), False)
    except ValueError:
        raise _FrameError("INVALID_MESSAGE", "text frames must be JSON") from None


def encode_frame(payload: Any, binary: bool) -> dict[str, Any]:
    """The websocket send message for `payload`: msgpack bytes or JSON text."""
    if binary:
        import msgpack

        return {"type": "websocket.send", "bytes": msgpack.packb(payload, use_bin_type=True, default=str)}
    return {"type": "websocket.send", "text": json.dumps(payload, default=str)}


def error_frame(error: str, reason: str, request_id: Any = None) -> dict[str, Any]:
    frame = {"type": "x-fal-error", "error": error, "reason": reason}
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


class _FrameError(Exception):
    def __init__(self, error: str, reason: str):
        super().__init__(reason)
        self.error, self.reason = error, reason


class RealtimeContext:
    """The job context a realtime call runs with: no queue job; stops when the socket has gone away."""

    def __init__(self, closed: Callable[[], bool]):
        self._closed = closed

    def log(self, message: str, level: str = "INFO") -> None:
        log.debug("realtime: %s", message)

    def check(self) -> None:
        if self._closed():
            raise JobCancelledError("the realtime connection closed")

    def progress(self, step: int, num_steps: int, preview: Any = None) -> None:
        self.check()


@dataclass
class RealtimeConfig:
    """What a realtime session needs from the app: `prepare(app_id, args, base_url)` (validated call, inputs
    fetched), `execute(call, ctx, base_url)` (runs and renders it), `key_ok(header)` (the key header check),
    `signer` (tokens), `known(app_id)` (the app's canonical id, or raises `EngineError`)."""

    prepare: Callable[[str, dict[str, Any], str], Any]
    execute: Callable[[Any, RealtimeContext, str], dict[str, Any]]
    key_ok: Callable[[str | None], bool]
    signer: TokenSigner
    known: Callable[[str], str]
    requires_auth: bool = True


async def _refuse(websocket: WebSocket, error: str, reason: str) -> None:
    await websocket.accept()
    frame = error_frame(error, reason)
    if error == UNAUTHORIZED:
        frame["status"] = "error"  # with error "Unauthorized": what the JS client takes as "get a new token"
    await websocket.send_text(json.dumps(frame))
    await websocket.close(POLICY_VIOLATION, reason[:120])


def _authorize(websocket: WebSocket, app_id: str, config: RealtimeConfig) -> None:
    token = websocket.query_params.get("fal_jwt_token")
    if token:
        config.signer.verify(token, "realtime", app_id)
        return
    if config.requires_auth and not config.key_ok(websocket.headers.get("authorization")):
        raise UnauthorizedError("missing or wrong credentials: pass ?fal_jwt_token= (POST /tokens/) or "
                         "`Authorization: Key <key>`")


async def serve_realtime(websocket: WebSocket, app_path: str, config: RealtimeConfig) -> None:
    """One realtime connection, from handshake to close."""
    try:
        app_id = config.known(app_path)
        _authorize(websocket, app_id, config)
        raw = websocket.query_params.get("max_buffering")
        buffering = int(raw) if raw else 1
        if not MAX_BUFFERING[0] <= buffering <= MAX_BUFFERING[1]:
            raise ValueError
    except UnauthorizedError as e:
        await _refuse(websocket, UNAUTHORIZED, str(e))
        return
    except EngineError as e:
        await _refuse(websocket, e.error_type.upper(), str(e))
        return
    except ValueError:
        await _refuse(websocket, "INVALID_REQUEST", f"max_buffering must be an integer in {MAX_BUFFERING}")
        return
    await websocket.accept()
    scheme = "https" if websocket.url.scheme == "wss" else "http"
    base_url = f"{scheme}://{websocket.url.netloc}/"
    pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=buffering)
    arrived = asyncio.Event()
    closed = False

    async def reader() -> None:
        nonlocal closed
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                pending.append(message)  # a full buffer drops its oldest: the newest request wins
                arrived.set()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            closed = True
            arrived.set()

    async def send(message: dict[str, Any]) -> None:
        nonlocal closed
        if websocket.application_state is not WebSocketState.CONNECTED or closed:
            return
        try:
            await websocket.send(message)
        except Exception:  # noqa: BLE001 - the client went away between the check and the send
            closed = True

    async def handle(message: dict[str, Any]) -> None:
        request_id = None
        try:
            frame = decode_frame(message)
            arguments = frame.arguments
            if not isinstance(arguments, dict):
                raise _FrameError("INVALID_MESSAGE", "a frame must hold the arguments object")
            if arguments.get("type") == "x-fal-message":
                return  # a meta message: nothing to run
            arguments = dict(arguments)
            request_id = arguments.pop("request_id", None)
            arguments.setdefault("sync_mode", True)  # images inline: a realtime client shows them at once
            call = await run_in_threadpool(config.prepare, app_id, arguments, base_url)
            ctx = RealtimeContext(lambda: closed)
            result = await run_in_threadpool(config.execute, call, ctx, base_url)
            if request_id is not None:
                result = {**result, "request_id": request_id}
            await send(encode_frame(result, frame.binary))
        except _FrameError as e:
            await send(encode_frame(error_frame(e.error, e.reason, request_id), False))
        except JobCancelledError:
            return
        except EngineError as e:
            await send(encode_frame(error_frame(e.error_type.upper(), str(e), request_id), False))
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the connection
            log.exception("realtime request on %s failed", app_id)
            await send(encode_frame(error_frame("INTERNAL_ERROR", f"{type(e).__name__}: {e}", request_id), False))

    reading = asyncio.create_task(reader())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            while pending and not closed:
                await handle(pending.popleft())
            if closed:
                break
    finally:
        reading.cancel()
        try:
            await reading
        except BaseException:  # noqa: BLE001 - cancelled on purpose
            pass
        if websocket.application_state is WebSocketState.CONNECTED:
            try:
                await websocket.close()
            except RuntimeError:
                pass
