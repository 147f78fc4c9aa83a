"""The job queue's durability and hygiene: no exception stops the worker, close() stops every thread, retention by
age/count/bytes removes results with their files, and a restart on the same state dir serves completed results,
re-runs queued jobs and fails running ones as `interrupted` (in process, and against a real `engine serve` killed
with SIGKILL). Loopback only, bounded in time."""

import signal
import threading
import time
from pathlib import Path

import pytest

from engine import Engine
from engine.runtime.files import FileStore
from engine.runtime.jobstore import JobStore, StateDirLockedError
from engine.runtime.queue import JobQueue, durable_queue, queue_for
from engine.service import Completed, FalService, error_type_of

TINY = {"fal-ai/fast-sdxl": "tiny-sdxl"}
# the KeyboardInterrupt test's worker re-raises (after failing the job) and pytest reports that thread's exception
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


class Boom(BaseException):
    """Not an Exception: the kind that used to kill the only worker."""


def _ours() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("engine-")}


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -- the worker survives anything ----------------------------------------------------------------------------------
def test_base_exceptions_fail_the_job_and_later_jobs_complete():
    with JobQueue(name="t-boom") as q:
        def boom(ctx):
            raise Boom("not an Exception")

        def interrupt(ctx):
            raise KeyboardInterrupt

        bad = q.submit(boom)
        ki = q.submit(interrupt)
        later = [q.submit(lambda ctx, i=i: i) for i in range(3)]
        for job in [bad, ki, *later]:
            assert job.wait(20)
        assert isinstance(bad.error, Boom) and error_type_of(bad.error) == "internal_error"
        assert isinstance(ki.error, KeyboardInterrupt)
        assert [j.result for j in later] == [0, 1, 2] and all(j.error is None for j in later)
        _wait(lambda: all(t.is_alive() for t in q._threads))  # the worker that re-raised was replaced
        assert q.submit(lambda ctx: "still here").wait(20)


def test_close_stops_threads_and_removes_temporary_files(tmp_path):
    before = _ours()
    q = JobQueue(name="t-close")
    files = FileStore(ttl_s=60)
    assert q.submit(lambda ctx: files.put(b"x" * 10, "png").key).wait(20)
    assert len(_ours() - before) >= 3  # worker, janitor, file purge
    q.close()
    files.close()
    assert not (_ours() - before) and not files.root.exists()
    with pytest.raises(RuntimeError):
        q.submit(lambda ctx: 1)

    with Engine(device="cpu") as eng:  # the engine's queue: started by use, stopped by the context manager
        assert queue_for(eng).submit(lambda ctx: 1).wait(20)
        assert len(_ours() - before) >= 2
    assert not (_ours() - before)


# -- retention -----------------------------------------------------------------------------------------------------
def test_retention_by_count_and_bytes_purges_oldest_with_files(tmp_path):
    files = FileStore(tmp_path / "files", ttl_s=600)

    def writer(size):
        def fn(ctx):
            return {"file": files.put(b"\0" * size, "png").key}
        return fn

    with JobQueue(name="t-count", max_jobs=3, max_bytes=None) as q:
        jobs = [q.submit(writer(10)) for _ in range(5)]
        assert all(j.wait(20) for j in jobs)
        _wait(lambda: q.stats()["finished"] == 3)
        assert [q.get(j.id) is not None for j in jobs] == [False, False, True, True, True]
        assert [(files.root / j.result["file"]).exists() for j in jobs] == [False, False, True, True, True]

    with JobQueue(name="t-bytes", max_jobs=None, max_bytes=2500) as q:
        jobs = [q.submit(writer(1000)) for _ in range(4)]
        assert all(j.wait(20) for j in jobs)
        _wait(lambda: q.stats()["finished"] == 2)
        assert [q.get(j.id) is not None for j in jobs] == [False, False, True, True]
        assert [(files.root / j.result["file"]).exists() for j in jobs] == [False, False, True, True]
        assert q.stats()["bytes"] <= 2500

    with JobQueue(name="t-age", retention_s=0.2) as q:  # age: the janitor purges without any new submit
        job = q.submit(writer(10))
        assert job.wait(20)
        _wait(lambda: q.get(job.id) is None, 10)
        assert not (files.root / job.result["file"]).exists()
    files.close()


def test_previews_are_bounded_while_running():
    from engine.runtime import queue as queue_mod

    def fn(ctx):
        for i in range(10):
            ctx.progress(i + 1, 10, preview=lambda: "img" * 100)
        return None

    with JobQueue(name="t-prev") as q:
        job = q.submit(fn, want_previews=True)
        assert job.wait(20)
        with_preview = [e for e in job.events if e.kind == "progress" and "preview" in e.data]
        assert len(with_preview) == queue_mod.KEEP_PREVIEWS
        assert [e.data["step"] for e in with_preview] == [9, 10]


# -- restart on the same state dir (in process) -------------------------------------------------------------------
def test_restart_serves_completed_reruns_queued_and_fails_running(engine, tmp_path):
    state = tmp_path / "state"
    q1 = durable_queue("t-restart-1", state)
    fal1 = FalService(engine, endpoint_overrides=TINY, files=FileStore(state / "files"), queue=q1)
    done = fal1.submit("fal-ai/fast-sdxl", {"prompt": "kept", "seed": 3, **SMALL})
    result = done.get(120)
    path = Path(result["images"][0]["url"].removeprefix("file://"))
    assert path.is_file()
    with pytest.raises(StateDirLockedError):
        JobStore(state)  # one process per state dir

    started = threading.Event()

    def blocker(ctx):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.01)

    running = q1.submit(blocker, app_id="blocker")
    assert started.wait(20)
    queued = fal1.submit("fal-ai/fast-sdxl", {"prompt": "resumed", "seed": 4, **SMALL})
    assert queued.status() == fal1.status(queued.request_id)
    fal1.close(timeout=20)  # graceful: the running job ends interrupted, the queued one stays queued on disk
    assert running.done and error_type_of(running.error) == "interrupted"
    assert path.is_file()

    crashed = JobStore(state)  # a job that was running when its process died
    crashed.add("crashed-job", "fal-ai/fast-sdxl", record={"arguments": {"prompt": "x"}}, meta={})
    crashed.started("crashed-job")
    crashed.close()

    q2 = durable_queue("t-restart-2", state)
    fal2 = FalService(engine, endpoint_overrides=TINY, files=FileStore(state / "files"), queue=q2)
    try:
        status = fal2.status(done.request_id, with_logs=True)
        assert isinstance(status, Completed) and status.error is None and status.logs
        assert fal2.result(done.request_id) == result and path.is_file()
        lost = fal2.status("crashed-job")
        assert isinstance(lost, Completed) and lost.error_type == "interrupted"
        assert fal2.status(running.id).error_type == "interrupted"
        with pytest.raises(Exception) as info:
            fal2.result("crashed-job")
        assert getattr(info.value, "http_status", None) == 503
        assert q2.recover(fal2.resume) == {"resumed": 1, "failed": 0}
        again = fal2.get_handle(queued.request_id).get(120)
        assert again["seed"] == 4 and again["prompt"] == "resumed"
    finally:
        fal2.close()


def test_fal_service_state_dir_is_the_servers_durable_store(tmp_path):
    """The in-process API on `state_dir` keeps jobs as `engine serve --state-dir` does: completed results outlive a
    restart, queued jobs run again on their own, running ones end `interrupted`."""
    state = tmp_path / "state"
    eng = Engine(device="cpu")
    fal1 = FalService(eng, endpoint_overrides=TINY, state_dir=state, retention_s=600)
    assert fal1.queue.store is not None and fal1.queue.store.root == state
    with pytest.raises(ValueError, match="state_dir"):
        FalService(eng, state_dir=tmp_path / "elsewhere")  # the engine's queue is already on `state`
    done = fal1.submit("fal-ai/fast-sdxl", {"prompt": "kept", "seed": 3, **SMALL})
    result = done.get(120)
    assert Path(result["images"][0]["url"].removeprefix("file://")).is_relative_to(state)
    started = threading.Event()

    def blocker(ctx):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.01)

    running = fal1.queue.submit(blocker, app_id="blocker")
    assert started.wait(20)
    queued = fal1.submit("fal-ai/fast-sdxl", {"prompt": "resumed", "seed": 4, **SMALL})
    fal1.close(timeout=20)

    with FalService(eng, endpoint_overrides=TINY, state_dir=state, retention_s=600) as fal2:
        assert fal2.result(done.request_id) == result
        assert fal2.status(running.id).error_type == "interrupted"
        again = fal2.get_handle(queued.request_id).get(120)  # re-queued at start, no `recover` call needed
        assert again["seed"] == 4 and again["prompt"] == "resumed"
    eng.close()


# -- a real server, killed with SIGKILL mid-run --------------------------------------------------------------------
def test_sigkill_mid_run_and_restart_on_the_same_state_dir(tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serving import free_port, start_server, stop_server

    port, state = free_port(), tmp_path / "state"
    base = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--state-dir", str(state),
            "--endpoint", "fal-ai/fast-sdxl=tiny-sdxl", "--log-level", "warning"]
    http = httpx.Client(timeout=30)

    def start(log_name: str):
        return start_server(args, tmp_path / log_name, f"{base}/health")

    def submit(args: dict) -> str:
        r = http.post(f"{base}/queue/fal-ai/fast-sdxl", json={"prompt": "x", **args})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def status(rid: str) -> dict:
        r = http.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{rid}/status")
        assert r.status_code == 200, r.text
        return r.json()

    def until_done(rid: str, timeout: float = 120) -> dict:
        _wait(lambda: status(rid)["status"] == "COMPLETED", timeout)
        return status(rid)

    proc = start("server1.log")
    try:
        done = submit({"seed": 1, **SMALL})
        assert until_done(done)["error"] is None
        first = http.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{done}").json()
        key = first["images"][0]["file_name"]
        assert http.get(f"{base}/files/{key}").status_code == 200
        slow = submit({"seed": 2, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50})
        queued = [submit({"seed": 10 + i, **SMALL}) for i in range(2)]
        _wait(lambda: status(slow)["status"] == "IN_PROGRESS", 60)
        assert all(status(q)["status"] == "IN_QUEUE" for q in queued)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    proc = start("server2.log")
    try:
        again = status(done)
        assert again["status"] == "COMPLETED" and again["error"] is None
        assert http.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{done}").json() == first
        assert http.get(f"{base}/files/{key}").status_code == 200
        lost = until_done(slow)
        assert lost["error_type"] == "interrupted"
        r = http.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{slow}")
        assert r.status_code == 503 and r.json()["error_type"] == "interrupted"
        for i, rid in enumerate(queued):
            assert until_done(rid)["error"] is None
            out = http.get(f"{base}/queue/fal-ai/fast-sdxl/requests/{rid}").json()
            assert out["seed"] == 10 + i
    finally:
        stop_server(proc)
        http.close()
