"""fal's API in process (FalService), the job queue, the output store, previews and the endpoint schemas."""

import asyncio
import base64
import io
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, errors
from engine.endpoints import (IMAGE_SIZES, EndpointTable, FastLightningSDXLInput, FastSDXLInput, LoraInput,
                              StableDiffusion15Input, load_image_argument, parse_override)
from engine.models.previews import preview_image
from engine.runtime.files import FileStore
from engine.errors import AppNotFoundError, EndpointUnavailableError, JobTimeoutError, RequestNotFoundError
from engine.runtime.queue import JobQueue, JobState, queue_for
from engine.service import Completed, FalService, InProgress, Queued

from conftest import images_close

TINY = {
    "fal-ai/fast-sdxl": "tiny-sdxl", "fal-ai/fast-lightning-sdxl": "tiny-sdxl",
    "fal-ai/stable-diffusion-v1-5": "tiny-sd15", "fal-ai/flux/dev": "tiny-flux", "fal-ai/flux/schnell": "tiny-flux",
    "fal-ai/aura-sr": "tiny-aura-sr",
}
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


def _png(folder: Path) -> Path:
    path = folder / "local.png"
    Image.new("RGB", (3, 2)).save(path)
    return path


@pytest.fixture(scope="module")
def fal(engine, tmp_path_factory):
    return FalService(engine, endpoint_overrides=TINY, files=FileStore(tmp_path_factory.mktemp("files")))


def _open(image_obj: dict) -> Image.Image:
    url = image_obj["url"]
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return Image.open(url2pathname(urlsplit(url).path))


# -- schemas and preparation ----------------------------------------------------------------------------------------
def test_schema_defaults_follow_fal():
    sdxl = FastSDXLInput(prompt="x")
    assert (sdxl.image_size, sdxl.num_inference_steps, sdxl.guidance_scale) == ("square_hd", 25, 7.5)
    assert sdxl.format == "jpeg"
    assert sdxl.enable_safety_checker is True and sdxl.num_images == 1 and sdxl.loras == []
    assert FastLightningSDXLInput(prompt="x", num_inference_steps=2).num_inference_steps == "2"
    assert StableDiffusion15Input(prompt="x").image_size == "square"
    assert LoraInput(model_name="m", prompt="x", image_format="png").format == "png"
    assert IMAGE_SIZES["landscape_4_3"] == (1024, 768) and IMAGE_SIZES["portrait_16_9"] == (576, 1024)
    assert parse_override("fal-ai/flux/dev=tiny-flux") == ("fal-ai/flux/dev", "tiny-flux")
    with pytest.raises(ValueError):
        parse_override("fal-ai/flux/dev")
    with pytest.raises(AppNotFoundError):
        EndpointTable({"fal-ai/nope": "tiny-sdxl"})


def test_endpoint_table_reads_config_and_overrides():
    table = EndpointTable()
    assert table.model_for("fal-ai/fast-sdxl") == "sdxl"
    assert table.model_for("fal-ai/aura-sr", "v2") == "aura-sr-v2"
    assert table.model_for("fal-ai/fast-lightning-sdxl", "2") == "sdxl-lightning-2step"
    assert table.model_for("fal-ai/fast-lightning-sdxl", "4") == "sdxl-lightning"
    table = EndpointTable({"fal-ai/aura-sr": "tiny-aura-sr"})
    assert table.model_for("fal-ai/aura-sr", "v2") == "tiny-aura-sr"


@pytest.mark.parametrize(
    "app, args, field",
    [
        ("fal-ai/fast-sdxl", {"image_size": {"width": 100, "height": 64}}, "image_size.width"),
        ("fal-ai/flux/dev", {"image_size": {"width": 64, "height": 72}}, "image_size.height"),
        ("fal-ai/stable-diffusion-v1-5", {"width": 68}, "width"),
        ("fal-ai/fast-sdxl", {"num_images": 9}, "num_images"),
        ("fal-ai/fast-sdxl", {"image_size": "huge"}, "image_size"),
        ("fal-ai/fast-lightning-sdxl", {"num_inference_steps": 3}, "num_inference_steps"),
        ("fal-ai/fast-sdxl", {"loras": [{"path": "owner/lora", "scale": 9.0}]}, "loras"),
    ],
)
def test_invalid_arguments_are_422_before_queueing(fal, app, args, field):
    with pytest.raises(errors.InvalidRequestError) as info:
        fal.prepare(app, {"prompt": "x", **args})
    assert info.value.field.startswith(field) and info.value.http_status == 422
    detail = info.value.to_dict()["detail"][0]
    assert detail["loc"][0] == "body"


def test_untrusted_callers_cannot_name_local_paths(engine, tmp_path):
    http_side = FalService(engine, trusted=False)
    with pytest.raises(errors.InvalidRequestError) as info:
        http_side.prepare("fal-ai/lora", {"model_name": "/etc/models/x.safetensors", "prompt": "x"})
    assert info.value.field == "model_name"
    with pytest.raises(errors.InvalidRequestError) as info:
        load_image_argument(str(_png(tmp_path)), allow_private_urls=True)
    assert info.value.field == "image_url"
    assert load_image_argument(str(_png(tmp_path)), allow_private_urls=False, trusted=True).size == (3, 2)
    call = http_side.prepare("fal-ai/lora", {"model_name": "tiny-sd15", "prompt": "x", **SMALL})
    assert call.model == "tiny-sd15"


def test_unknown_app_is_404(fal):
    with pytest.raises(AppNotFoundError) as info:
        fal.run("fal-ai/not-an-app", {"prompt": "x"})
    assert info.value.http_status == 404


def test_aura_sr_upscales_a_data_uri(fal):
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = fal.run("fal-ai/aura-sr", {"image_url": uri, "seed": 1})
    assert (out["image"]["width"], out["image"]["height"]) == (64, 48)
    assert _open(out["image"]).size == (64, 48) and "inference" in out["timings"]


# -- image inputs: SSRF ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/health", "https://localhost/x.png", "http://10.0.0.7/x.png", "http://192.168.1.1/x.png",
     "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "http://0.0.0.0/x.png",
     "file:///etc/passwd", "ftp://example.com/x.png", "gopher://127.0.0.1/"],
)
def test_image_urls_to_private_addresses_are_refused(url):
    with pytest.raises(errors.InvalidRequestError) as info:
        load_image_argument(url, allow_private_urls=False)
    assert info.value.field == "image_url" and info.value.http_status == 422


def test_image_data_uri_decodes_and_garbage_is_422():
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buf, format="PNG")
    image = load_image_argument("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                                allow_private_urls=False)
    assert image.size == (5, 3)
    for bad in ("data:image/png;base64,!!!!", "data:image/png;base64," + base64.b64encode(b"not an image").decode()):
        with pytest.raises(errors.InvalidRequestError):
            load_image_argument(bad, allow_private_urls=False)


# -- fal API in process ---------------------------------------------------------------------------------------------
def test_run_shapes_the_result_like_fal(fal):
    out = fal.run("fal-ai/fast-sdxl", {"prompt": "a red door", "seed": 5, "num_images": 2, "format": "png",
                                       "image_size": {"width": 96, "height": 64}, "num_inference_steps": 1})
    assert out["seed"] == 5 and out["prompt"] == "a red door"
    assert len(out["images"]) == 2 and out["has_nsfw_concepts"] == [None, None]
    assert out["safety_checker"]["ran"] is False
    assert out["timings"]["inference"] > 0
    for image_obj in out["images"]:
        assert image_obj["content_type"] == "image/png" and image_obj["url"].startswith("file://")
        assert (image_obj["width"], image_obj["height"]) == (96, 64)
        assert Path(url2pathname(urlsplit(image_obj["url"]).path)).stat().st_size == image_obj["file_size"]
        assert _open(image_obj).size == (96, 64)


def test_run_equals_direct_generate(fal, engine):
    out = fal.run("fal-ai/flux/dev", {"prompt": "a boat", "seed": 11, "output_format": "png", "sync_mode": True,
                                      "guidance_scale": 3.5, **SMALL})
    assert out["images"][0]["url"].startswith("data:image/png;base64,")
    direct = engine.generate(model="tiny-flux", prompt="a boat", seed=11, width=64, height=64,
                             num_inference_steps=1, guidance_scale=3.5)
    ok, frac = images_close([_open(out["images"][0]).convert("RGB")], direct.images, levels=0, fraction=1.0)
    assert ok, frac


def test_submit_status_events_and_get(fal):
    handle = fal.submit("fal-ai/fast-sdxl", {"prompt": "x", "seed": 1, **SMALL, "num_inference_steps": 2})
    assert isinstance(handle.status(), (Queued, InProgress, Completed))
    seen = list(handle.iter_events(with_logs=True, interval=0.5))
    assert isinstance(seen[-1], Completed) and seen[-1].error is None
    assert seen[-1].metrics["inference_time"] > 0
    assert any("step 2/2" in entry["message"] for entry in seen[-1].logs)
    assert {"message", "level", "source", "timestamp"} <= set(seen[-1].logs[0])
    assert handle.get()["seed"] == 1
    assert fal.result(handle.request_id)["seed"] == 1
    assert isinstance(fal.status(handle.request_id), Completed)
    with pytest.raises(RequestNotFoundError):
        fal.status("no-such-id")


def test_subscribe_reports_updates(fal):
    updates, enqueued = [], []
    out = fal.subscribe("fal-ai/stable-diffusion-v1-5", {"prompt": "x", "seed": 2, "width": 64, "height": 64,
                                                         "num_inference_steps": 1},
                        with_logs=True, on_enqueue=enqueued.append, on_queue_update=updates.append)
    assert len(enqueued) == 1 and isinstance(updates[-1], Completed)
    assert out["images"][0]["width"] == 64


def test_stream_yields_progress_with_preview_then_result(fal):
    events = list(fal.stream("fal-ai/fast-sdxl", {"prompt": "x", "seed": 3, **SMALL, "num_inference_steps": 2}))
    progress, result = events[:-1], events[-1]
    assert [e["step"] for e in progress] == [1, 2] and all(e["num_steps"] == 2 for e in progress)
    preview = _open(progress[0]["preview"])
    assert preview.size == (progress[0]["preview"]["width"], progress[0]["preview"]["height"])
    assert result["images"] and "type" not in result


def test_cancel_queued_and_running(fal):
    slow = fal.submit("fal-ai/fast-sdxl", {"prompt": "slow", "seed": 1, **SMALL, "num_inference_steps": 50})
    queued = fal.submit("fal-ai/fast-sdxl", {"prompt": "queued", "seed": 1, **SMALL})
    assert isinstance(queued.status(), Queued)
    assert queued.cancel() == "cancelled"
    final = queued.status()
    assert isinstance(final, Completed) and final.error_type == "cancelled"
    with pytest.raises(errors.JobCancelledError):
        queued.get()
    deadline = time.monotonic() + 60
    while not isinstance(slow.status(), InProgress) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.cancel() == "requested"
    with pytest.raises(errors.JobCancelledError):
        slow.get(timeout=60)
    steps = [e["message"] for e in slow.status(with_logs=True).logs if e["message"].startswith("step ")]
    assert len(steps) < 50
    assert queued.cancel() == "completed"
    assert fal.run("fal-ai/fast-sdxl", {"prompt": "after", "seed": 1, **SMALL})["images"]


def test_job_error_completes_with_error_and_service_keeps_working(engine):
    # trusted: an untrusted caller's uncached hub id is refused before queueing (tests/test_untrusted.py)
    service = FalService(engine, endpoint_overrides={"fal-ai/fast-sdxl": "tiny-sdxl"}, trusted=True)
    handle = service.submit("fal-ai/lora", {"model_name": "nobody/no-such-model-here", "prompt": "x", **SMALL})
    with pytest.raises(errors.ModelNotFoundError):
        handle.get(timeout=60)
    status = handle.status()
    assert isinstance(status, Completed) and status.error
    assert status.error_type in ("model_not_found", "hub_unavailable")
    assert service.run("fal-ai/fast-sdxl", {"prompt": "x", **SMALL})["images"]


def test_async_variants(fal):
    async def main():
        out = await fal.run_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 4, **SMALL})
        handle = await fal.submit_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 4, **SMALL})
        statuses = [s async for s in handle.iter_events(with_logs=True)]
        again = await handle.get()
        updates = []
        sub = await fal.subscribe_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 4, **SMALL},
                                        on_queue_update=updates.append)
        streamed = [e async for e in fal.stream_async("fal-ai/fast-sdxl", {"prompt": "x", "seed": 4, **SMALL})]
        return out, statuses, again, sub, updates, streamed

    out, statuses, again, sub, updates, streamed = asyncio.run(main())
    assert out["seed"] == again["seed"] == sub["seed"] == streamed[-1]["seed"] == 4
    assert isinstance(statuses[-1], Completed) and isinstance(updates[-1], Completed)
    assert streamed[0]["type"] == "progress"


def test_fal_service_wraps_an_engine_and_shares_its_queue():
    import engine as package

    eng = package.Engine(device="cpu")
    assert not any(hasattr(eng, name) for name in ("run", "submit", "subscribe", "stream", "fal"))  # no fal in Engine
    with package.FalService(eng, endpoint_overrides=TINY) as one:
        two = package.FalService(eng, endpoint_overrides=TINY, trusted=True)
        assert one.queue is two.queue is queue_for(eng)  # one worker per engine: services take turns on the device
        assert one.run("fal-ai/fast-sdxl", {"prompt": "x", "seed": 1, **SMALL})["seed"] == 1
        assert two.submit("fal-ai/fast-sdxl", {"prompt": "x", "seed": 2, **SMALL}).get()["seed"] == 2
    assert queue_for(eng) is not one.queue  # closed with the service; the engine's next user gets a fresh queue
    eng.close()


def test_engine_close_stops_its_queue():
    eng = Engine(device="cpu")
    fal = FalService(eng)
    assert fal.queue.submit(lambda ctx: 1).wait(20)
    eng.close()
    with pytest.raises(RuntimeError):
        fal.queue.submit(lambda ctx: 1)
    fal.files.close()


# -- queue ----------------------------------------------------------------------------------------------------------
def _steps_job(n: int, delay: float, record: list | None = None):
    def fn(ctx):
        for i in range(n):
            time.sleep(delay)
            ctx.progress(i + 1, n, preview=lambda: "p")
        if record is not None:
            record.append(ctx.job.id)
        return {"steps": n}

    return fn


def test_queue_positions_fifo_and_failures_do_not_kill_the_worker():
    q = JobQueue(name="test")
    try:
        order: list[str] = []
        first = q.submit(_steps_job(5, 0.02, order))
        bad = q.submit(lambda ctx: 1 / 0)
        rest = [q.submit(_steps_job(1, 0.0, order)) for _ in range(3)]
        assert [q.position(j) for j in rest] in ([2, 3, 4], [1, 2, 3])
        for j in [first, bad, *rest]:
            assert j.wait(30)
        assert order == [first.id] + [j.id for j in rest]
        assert isinstance(bad.error, ZeroDivisionError) and bad.state is JobState.COMPLETED
        assert first.result == {"steps": 5} and q.position(first) is None
        assert [e.data["step"] for e in first.events if e.kind == "progress"] == [1, 2, 3, 4, 5]
        assert all("preview" not in e.data for e in first.events if e.kind == "progress")
    finally:
        q.shutdown()


def test_queue_timeouts_and_retention():
    q = JobQueue(name="test", retention_s=0.2)
    try:
        running = q.submit(_steps_job(200, 0.01), timeout_s=0.3)
        starved = q.submit(_steps_job(1, 0.0), start_timeout_s=0.1)
        assert running.wait(30) and starved.wait(30)
        assert isinstance(running.error, JobTimeoutError) and isinstance(starved.error, JobTimeoutError)
        assert running.error.http_status == 504
        time.sleep(0.3)
        q.submit(_steps_job(1, 0.0)).wait(10)  # a submit purges expired results
        assert q.get(running.id) is None
    finally:
        q.shutdown()


def test_queue_is_thread_safe_under_concurrent_submitters():
    q = JobQueue(name="test")
    jobs: list = []
    lock = threading.Lock()

    def submitter() -> None:
        for _ in range(10):
            job = q.submit(_steps_job(1, 0.0))
            with lock:
                jobs.append(job)

    try:
        threads = [threading.Thread(target=submitter) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len({j.id for j in jobs}) == 60
        assert all(j.wait(30) and j.error is None for j in jobs)
        assert q.depth() == (0, 0)
    finally:
        q.shutdown()


# -- files and previews ---------------------------------------------------------------------------------------------
def test_file_store_ttl_and_key_validation(tmp_path):
    store = FileStore(tmp_path, ttl_s=0.2)
    obj = store.image_object(Image.new("RGB", (8, 4)), "png", sync_mode=False, base_url="https://h:1/")
    key = obj["file_name"]
    assert obj["url"] == f"https://h:1/files/{key}" and store.get(key).size == obj["file_size"]
    assert store.get("../etc/passwd") is None and store.get("x" * 20 + ".gif") is None
    time.sleep(0.3)
    assert store.get(key) is None
    assert store.purge() == 1 and not (tmp_path / key).exists()


@pytest.mark.parametrize("family, latents", [
    ("sd15", torch.randn(1, 4, 8, 12)),
    ("sdxl", torch.randn(2, 4, 8, 12)),
    ("flux", torch.randn(1, 4 * 6, 64)),   # packed: (64 / 16) x (96 / 16) patches of 16 channels x 2 x 2
    ("flux", torch.randn(1, 4 * 6, 16)),   # tiny FLUX: 4 latent channels packed
])
def test_previews_are_small_rgb_images(family, latents):
    image = preview_image(latents, family, width=96, height=64)
    assert image.mode == "RGB" and image.size == (96, 64)
    assert np.asarray(image).std() > 0


def test_webhook_is_delivered_and_private_targets_refused(engine):
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        with pytest.raises(errors.InvalidRequestError) as info:
            FalService(engine, endpoint_overrides=TINY).submit("fal-ai/fast-sdxl", {"prompt": "x", **SMALL}, url)
        assert info.value.field == "fal_webhook"
        local = FalService(engine, endpoint_overrides=TINY, allow_private_urls=True)
        handle = local.submit("fal-ai/fast-sdxl", {"prompt": "x", "seed": 8, **SMALL}, webhook_url=url)
        handle.get(timeout=60)
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        (body,) = received
        assert body["request_id"] == handle.request_id and body["status"] == "OK"
        assert body["payload"]["seed"] == 8
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_unregistered_model_mapping_is_a_clear_501(engine):
    service = FalService(engine, endpoint_overrides={"fal-ai/fast-sdxl": "no-such-model-id"})
    with pytest.raises(EndpointUnavailableError, match="not a registered model"):
        service.prepare("fal-ai/fast-sdxl", {"prompt": "x"})


def test_abandoned_stream_cancels_its_job(fal):
    events = fal.stream("fal-ai/fast-sdxl", {"prompt": "x", "seed": 1, **SMALL, "num_inference_steps": 50})
    first = next(events)
    events.close()
    job = fal.job(first["request_id"])
    assert job.wait(60) and isinstance(job.error, errors.JobCancelledError)


def test_untrusted_lora_paths_must_be_urls_or_hub_ids(engine):
    http_side = FalService(engine, endpoint_overrides=TINY, trusted=False)
    with pytest.raises(errors.InvalidRequestError) as info:
        http_side.prepare("fal-ai/fast-sdxl", {"prompt": "x", "loras": [{"path": "/tmp/evil.safetensors"}], **SMALL})
    assert info.value.field == "loras.0.path"
    call = http_side.prepare("fal-ai/fast-sdxl", {"prompt": "x", "loras": [{"path": "owner/repo", "scale": 0.5}],
                                                  **SMALL})
    assert call.model == "tiny-sdxl"


class _StandInUpscaler:
    """Has the `Engine.upscale` signature the aura-sr endpoint calls; a plain 4x resize stands in for AuraSR so the
    endpoint's wiring (inputs, SSRF refusals, rendering, the arguments passed) is checked exactly and fast (the real
    upscaler behind the endpoint: test_aura_sr_upscales_a_data_uri, tests/test_upscale_api.py)."""

    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def upscale(self, *, image, model, upscale_factor, overlapping_tiles, seed):
        from types import SimpleNamespace

        self.calls.append({"model": model, "overlapping_tiles": overlapping_tiles, "seed": seed})
        return SimpleNamespace(image=image.resize((image.width * 4, image.height * 4)), seed=seed,
                               timings={"upsample": 0.01, "total": 0.01})


def test_aura_sr_endpoint_wiring_with_a_stand_in_upscaler():
    engine = _StandInUpscaler()
    service = FalService(engine, endpoint_overrides={"fal-ai/aura-sr": "tiny-aura-sr"}, trusted=False)
    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (0, 90, 200)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = service.run("fal-ai/aura-sr", {"image_url": uri, "overlapping_tiles": True, "seed": 5,
                                         "checkpoint": "v2", "sync_mode": True})
    assert (out["image"]["width"], out["image"]["height"]) == (40, 24) and out["image"]["content_type"] == "image/png"
    assert _open(out["image"]).size == (40, 24) and out["timings"]["inference"] == 0.01 and out["seed"] == 5
    assert engine.calls == [{"model": "tiny-aura-sr", "overlapping_tiles": True, "seed": 5}]
    for url in ("http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data/", "/etc/hostname"):
        with pytest.raises(errors.InvalidRequestError) as info:
            service.prepare("fal-ai/aura-sr", {"image_url": url})
        assert info.value.field == "image_url"
    with pytest.raises(errors.InvalidRequestError):
        service.prepare("fal-ai/aura-sr", {"image_url": uri, "upscale_factor": 2})
    assert len(engine.calls) == 1


def test_a_job_cancelled_while_waiting_for_the_engine_does_no_work(tmp_path):
    """A job cancelled while it waits for the engine's run lock (another request holds it) ends `cancelled` without
    applying its LoRA or running a step: the check comes right after the lock, before adapters move."""
    from test_lora import make_lora

    engine = Engine(device="cpu")
    try:
        with FalService(engine, endpoint_overrides=TINY, trusted=True) as service:
            app = "fal-ai/stable-diffusion-v1-5"
            service.run(app, {"prompt": "load", "seed": 1, **SMALL})
            slot = engine._slots["tiny-sd15"]
            before = slot.loras.active if slot.loras is not None else None
            lora = make_lora(tmp_path / "w.safetensors", 3, family="sd15")
            with engine._run_lock:  # as a request running on the engine would hold it
                handle = service.submit(app, {"prompt": "x", "seed": 2, **SMALL, "loras": [{"path": str(lora)}]})
                deadline = time.monotonic() + 30
                while not isinstance(handle.status(), InProgress):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                time.sleep(0.2)  # the job is past its LoRA download/resolution and waits for the lock
                assert handle.cancel() == "requested"
            with pytest.raises(errors.JobCancelledError):
                handle.get(timeout=30)
            assert (slot.loras.active if slot.loras is not None else None) == before
            assert not [e for e in handle.status(with_logs=True).logs if e["message"].startswith("step ")]
            assert service.run(app, {"prompt": "after", "seed": 1, **SMALL})["images"]
    finally:
        engine.close()


def test_an_upscale_cancelled_while_waiting_for_the_engine_does_not_run():
    engine = Engine(device="cpu")
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, format="PNG")
    args = {"image_url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "seed": 1}
    try:
        with FalService(engine, endpoint_overrides=TINY, trusted=True) as service:
            service.run("fal-ai/aura-sr", args)
            slot = engine._upscalers["tiny-aura-sr"]
            calls = []
            real = slot.pipeline.upscale
            slot.pipeline.upscale = lambda *a, **k: calls.append(1) or real(*a, **k)
            with engine._run_lock:
                handle = service.submit("fal-ai/aura-sr", args)
                deadline = time.monotonic() + 30
                while not isinstance(handle.status(), InProgress):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                time.sleep(0.2)
                assert handle.cancel() == "requested"
            with pytest.raises(errors.JobCancelledError):
                handle.get(timeout=30)
            assert calls == []
            assert service.run("fal-ai/aura-sr", args)["image"]["width"] == 64 and calls == [1]
    finally:
        engine.close()
