"""Scale-out without Ray: routing and batch keys, the keyed batcher (same keys batch, different keys never, bounded
size and wait), the multi-GPU plan on simulated capabilities, and `engine serve --replicas` without Ray."""

import asyncio
import subprocess
import sys
import time

import pytest

from engine.requests import GenerateRequest
from engine.scaleout.batching import BatchConfig, KeyedBatcher
from engine.scaleout.keys import adapter_key, batch_key
from engine.scaleout.parallel import ParallelCaps, apply_parallel, detect_caps, plan_parallel

BASE = dict(model="tiny-sd15", prompt="a", width=64, height=64, num_inference_steps=2)


def test_adapter_key_depends_on_paths_scales_and_order():
    a = GenerateRequest(**BASE, loras=[{"path": "x.safetensors"}, {"path": "y.safetensors", "scale": 0.5}])
    same = GenerateRequest(**{**BASE, "prompt": "other"}, seed=3,
                           loras=[{"path": "x.safetensors"}, {"path": "y.safetensors", "scale": 0.5}])
    swapped = GenerateRequest(**BASE, loras=[{"path": "y.safetensors", "scale": 0.5}, {"path": "x.safetensors"}])
    rescaled = GenerateRequest(**BASE, loras=[{"path": "x.safetensors"}, {"path": "y.safetensors", "scale": 0.6}])
    assert adapter_key(GenerateRequest(**BASE)) == ""
    assert adapter_key(a) == adapter_key(same) and adapter_key(a).startswith("loras-")
    assert len({adapter_key(a), adapter_key(swapped), adapter_key(rescaled)}) == 3


def test_batch_key_separates_shapes_steps_models_and_adapters_not_prompts_or_seeds():
    key = batch_key(GenerateRequest(**BASE, seed=1))
    assert batch_key(GenerateRequest(**{**BASE, "prompt": "b"}, seed=2)) == key
    for change in ({"width": 128}, {"height": 128}, {"num_inference_steps": 3}, {"model": "tiny-sdxl"},
                   {"guidance_scale": 2.0}, {"loras": [{"path": "x.safetensors"}]}, {"negative_prompt": "n"}):
        assert batch_key(GenerateRequest(**{**BASE, **change})) != key, change


def _run_batcher(config, submissions, delay_s=0.0):
    calls = []

    def run(items):
        calls.append(list(items))
        time.sleep(delay_s)
        return [f"done-{item}" for item in items]

    async def main():
        batcher = KeyedBatcher(run, config)
        results = await asyncio.gather(*(batcher.submit(k, i) for k, i in submissions))
        return results, batcher.batches

    results, sizes = asyncio.run(main())
    return results, sizes, calls


def test_batcher_groups_same_key_and_bounds_the_batch():
    results, sizes, calls = _run_batcher(BatchConfig(max_batch_size=4, max_wait_s=0.05),
                                         [("k", i) for i in range(10)])
    assert results == [f"done-{i}" for i in range(10)]  # split back per request, in order
    assert sizes == [4, 4, 2] and [len(c) for c in calls] == [4, 4, 2]


def test_batcher_never_mixes_keys():
    submissions = [("a" if i % 2 else "b", i) for i in range(8)]
    results, sizes, calls = _run_batcher(BatchConfig(max_batch_size=8, max_wait_s=0.05), submissions)
    assert results == [f"done-{i}" for i in range(8)]
    assert sorted(sizes) == [4, 4]
    for batch in calls:
        assert len({i % 2 for i in batch}) == 1


def test_batcher_waits_at_most_the_window_and_errors_reach_every_caller():
    t0 = time.monotonic()
    results, sizes, _ = _run_batcher(BatchConfig(max_batch_size=8, max_wait_s=0.05), [("k", 1)])
    assert results == ["done-1"] and sizes == [1] and time.monotonic() - t0 < 2.0

    def boom(items):
        raise ValueError("bad batch")

    async def main():
        batcher = KeyedBatcher(boom, BatchConfig(max_batch_size=2, max_wait_s=0.01))
        return await asyncio.gather(batcher.submit("k", 1), batcher.submit("k", 2), return_exceptions=True)

    errors = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in errors) and len(errors) == 2
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=0)


@pytest.mark.parametrize("family, caps, kind, degree, config", [
    ("flux", ParallelCaps("cuda", 4, nvlink=True, attention_heads=24), "context_ulysses", 4, {"ulysses_degree": 4}),
    ("flux", ParallelCaps("cuda", 4, nvlink=False, attention_heads=24), "context_ring", 4, {"ring_degree": 4}),
    ("flux", ParallelCaps("cuda", 5, nvlink=True, attention_heads=24), "context_ring", 5, {"ring_degree": 5}),
    ("sdxl", ParallelCaps("cuda", 4, nvlink=True), "cfg", 2, {}),
    ("sd15", ParallelCaps("cuda", 2), "cfg", 2, {}),
    ("sdxl", ParallelCaps("cuda", 1), "single", 1, {}),
    ("flux", ParallelCaps("cpu", 0), "single", 1, {}),
    ("aurasr", ParallelCaps("cuda", 8, nvlink=True), "single", 1, {}),
])
def test_parallel_plan_is_selected_by_capabilities(family, caps, kind, degree, config):
    plan = plan_parallel(family, caps)
    assert (plan.kind, plan.degree, plan.config) == (kind, degree, config) and plan.reason
    assert plan.parallel == (kind != "single")


def test_parallel_plan_without_guidance_and_apply_reports_why_not():
    assert plan_parallel("sdxl", ParallelCaps("cuda", 2), uses_cfg=False).kind == "single"
    caps = ParallelCaps("cuda", 4, nvlink=True, attention_heads=24)  # no process group: not applied, with reason
    applied, reason = apply_parallel(object(), plan_parallel("flux", caps), caps)
    assert not applied and "torch.distributed" in reason
    with pytest.raises(ValueError, match="compiler"):  # CFG plans are the compiler pass's, never applied here
        apply_parallel(object(), plan_parallel("sdxl", caps), caps)
    single = plan_parallel("sdxl", ParallelCaps("cuda", 1))
    assert apply_parallel(object(), single, caps) == (False, "one GPU visible to this replica")


def test_this_machine_plans_single_device_on_cpu():
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("several GPUs visible: the CPU plan does not apply")
    caps = detect_caps(attention_heads=24)
    plan = plan_parallel("flux", caps)
    assert plan.kind == "single" and ("CUDA" in plan.reason or "one GPU" in plan.reason)


def test_serve_replicas_without_ray_names_the_extra(tmp_path):
    """`engine serve --replicas 2` with Ray not importable: exit 2 and an error naming the extra."""
    shadow = tmp_path / "noray"
    shadow.mkdir()
    (shadow / "ray.py").write_text("raise ImportError('no ray here', name='ray')\n")
    code = ("import sys; sys.path.insert(0, %r); from engine.cli import main; "
            "sys.exit(main(['serve', '--replicas', '2', '--device', 'cpu', '--state-dir', %r]))"
            % (str(shadow), str(tmp_path / "state")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "engine[ray]" in out.stderr and "ray" in out.stderr


def test_nothing_in_engine_imports_ray_at_import_time():
    code = ("import sys, engine, engine.cli, engine.server.cli, engine.scaleout.serve, engine.scaleout.remote, "
            "engine.scaleout.batching, engine.scaleout.parallel; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# -- batching on a real engine (no Ray): fewer denoiser calls, each image its unbatched twin ------------------------
def _count_denoiser_calls(engine, model):
    slot = engine._slot(model)
    denoiser = slot.pipeline.denoiser()
    calls = []
    handle = denoiser.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-flux"])
def test_eight_concurrent_same_shape_requests_batch_into_fewer_model_calls(engine, model):
    from conftest import images_close

    requests = [GenerateRequest(model=model, prompt=f"a lighthouse {i}", width=64, height=64,
                                num_inference_steps=2, seed=100 + i) for i in range(8)]
    calls, hook = _count_denoiser_calls(engine, model)
    try:
        singles = [engine.generate(r) for r in requests]
        per_request = len(calls) // 8  # 2 steps: 2 denoiser calls (PNDM's first step takes 2)
        calls.clear()
        async def main():
            batcher = KeyedBatcher(engine.generate_batch, BatchConfig(max_batch_size=8, max_wait_s=0.2))
            out = await asyncio.gather(*(batcher.submit(batch_key(r), r) for r in requests))
            return out, batcher.batches

        batched, sizes = asyncio.run(main())
    finally:
        hook.remove()
    assert sizes == [8]
    assert len(calls) == per_request and per_request * 8 > len(calls)  # the eight share each denoiser call
    for single, result in zip(singles, batched):
        assert result.seed == single.seed and result.extra["batch_size"] == 8
        ok, frac = images_close(result.images, single.images)
        assert ok, frac


def test_different_shapes_never_batch_and_each_matches(engine):
    from conftest import images_close

    requests = [GenerateRequest(model="tiny-sd15", prompt="x", width=64, height=64 + 32 * (i % 2),
                                num_inference_steps=2 + (i % 4 == 3), seed=i) for i in range(8)]

    async def main():
        batcher = KeyedBatcher(engine.generate_batch, BatchConfig(max_batch_size=8, max_wait_s=0.2))
        out = await asyncio.gather(*(batcher.submit(batch_key(r), r) for r in requests))
        return out, batcher.batches

    batched, sizes = asyncio.run(main())
    assert sorted(sizes) == [2, 2, 4]  # (64x64, 2 steps) x4; (64x96, 2 steps) x2; (64x96, 3 steps) x2
    for request, result in zip(requests, batched):
        assert result.images[0].size == (request.width, request.height)
        assert result.num_inference_steps == request.num_inference_steps
        ok, frac = images_close(result.images, engine.generate(request).images)
        assert ok, frac


def test_a_batch_with_a_bad_request_gives_each_its_own_outcome(engine):
    good = GenerateRequest(model="tiny-sd15", prompt="ok", width=64, height=64, num_inference_steps=2, seed=1)
    bad = GenerateRequest(model="tiny-sd15", prompt="bad", width=64, height=64, num_inference_steps=2, seed=2,
                          scheduler="no-such-scheduler")
    out = engine.generate_batch([good, bad])
    assert out[0].images[0].size == (64, 64)
    assert isinstance(out[1], Exception) and "scheduler" in str(out[1])


def test_each_request_of_a_batch_gets_the_batch_steps_and_one_cancelled_does_not_stop_the_others(engine):
    """Step callbacks through a batch: every request sees each step with its own latents row; one that cancels
    (its callback raises the engine's cancel error) drops out while the batch finishes for the rest; when every
    request cancels, the batch stops at its next step and each gets the cancel error."""
    from conftest import images_close

    from engine.errors import JobCancelledError
    from engine.scaleout.batched import generate_batch

    requests = [GenerateRequest(**{**BASE, "prompt": f"p{i}"}, seed=20 + i) for i in range(3)]
    seen: list[list[tuple[int, int, tuple]]] = [[], [], []]

    def listener(j, cancel_at=None):
        def on_step(i, n, latents):
            if cancel_at is not None and i >= cancel_at:
                raise JobCancelledError("request cancelled")
            seen[j].append((i, n, tuple(latents.shape)))
        return on_step

    out = engine.generate_batch(requests)  # warm, and the reference images
    results = generate_batch(engine, requests, [listener(0), listener(1, cancel_at=1), listener(2)])
    n = seen[0][-1][1]
    assert [s[:2] for s in seen[0]] == [s[:2] for s in seen[2]] == [(i, n) for i in range(n)]
    assert [s[:2] for s in seen[1]] == [(0, n)]  # dropped out after its first step
    assert all(s[2][0] == 1 for row in seen for s in row)  # one latents row per request
    for j in (0, 2):
        assert results[j].extra["batch_size"] == 3
        ok, frac = images_close(results[j].images, out[j].images)
        assert ok, frac

    calls = [0]

    def stop_all(i, n, latents):
        calls[0] += 1
        raise JobCancelledError("request cancelled")

    stopped = generate_batch(engine, requests, [stop_all] * 3)
    assert all(isinstance(r, JobCancelledError) for r in stopped) and calls[0] == 3  # stopped after step 1


def test_loaded_models_answers_while_another_model_loads(engine):
    """A replica's answer counters and Serve's health check ask `loaded_models()`; a load holds the load lock for
    the whole build, and they must not wait for it."""
    import threading

    engine.load("tiny-sd15")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine._load_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        answer: list = []
        asker = threading.Thread(target=lambda: answer.append(engine.loaded_models()), daemon=True)
        asker.start()
        asker.join(1.0)
        assert answer and "tiny-sd15" in answer[0]
    finally:
        release.set()
        holder.join()


# -- a replica's cancel paths, on a fake engine (no Ray cluster: the worker's methods only) ------------------------
class _StepEngine:
    """Runs `steps` steps, calling the step callback each (which raises once the request is cancelled)."""

    def __init__(self, steps: int = 200):
        import threading

        self.steps = steps
        self.calls = []
        self.started = threading.Event()

    def generate(self, request, step_callback=None):
        self.calls.append(request.prompt)
        self.started.set()
        for i in range(self.steps):
            time.sleep(0.005)
            step_callback(i, self.steps, None)
        return f"image for {request.prompt}"

    def loaded_models(self):
        return []

    def close(self):
        pass


def _worker(engine, batching=None):
    from engine.scaleout.worker import EngineWorker

    worker = EngineWorker.__new__(EngineWorker)
    worker.engine, worker.replica, worker.pid = engine, "r0", 0
    worker.calls = worker.model_calls = worker.done = worker.failed = worker.cancelled = worker.steps = 0
    worker.stopped, worker.adapter_sets = [], []
    worker._batcher = KeyedBatcher(worker._run_batch, batching) if batching is not None else None
    worker._route_in = lambda: asyncio.sleep(0, result="")
    return worker


def test_a_cancelled_replica_request_stops_records_it_truthfully_and_leaves_no_lost_exception():
    engine = _StepEngine()
    worker = _worker(engine)
    lost = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _, context: lost.append(context))
        stream = worker.generate_stream(GenerateRequest(**BASE))
        assert "started" in await stream.__anext__()
        assert "step" in await stream.__anext__()
        await stream.aclose()  # what Serve does when the caller cancels
        import gc

        gc.collect()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert worker.cancelled == 1 and worker.done == 0
    record = worker.stopped[-1]
    assert record["stopped"] is True and 1 <= record["step"] < engine.steps
    assert not [c for c in lost if "never retrieved" in c.get("message", "")], lost


def test_a_request_cancelled_before_it_runs_does_no_engine_work_batched_or_not():
    from engine.errors import JobCancelledError
    from engine.scaleout.worker import _Listener

    engine = _StepEngine(steps=2)
    worker = _worker(engine)
    loop = asyncio.new_event_loop()
    try:
        stopped, live = _Listener(loop, False, lambda: None), _Listener(loop, False, lambda: None)
        stopped.stop.set()
        with pytest.raises(JobCancelledError):
            worker._generate(GenerateRequest(**BASE), stopped)
        assert engine.calls == [] and worker.model_calls == 0
        out = worker._run_batch([(GenerateRequest(**{**BASE, "prompt": "gone"}), None, stopped),
                                 (GenerateRequest(**{**BASE, "prompt": "kept"}), None, live)])
        assert isinstance(out[0], JobCancelledError) and out[1] == "image for kept"
        assert engine.calls == ["kept"] and worker.model_calls == 1
        assert worker._run_batch([(GenerateRequest(**BASE), None, stopped)])[0].__class__ is JobCancelledError
        assert engine.calls == ["kept"] and worker.model_calls == 1
    finally:
        loop.close()


def test_a_report_look_never_loads_and_a_remote_look_is_bounded(engine, monkeypatch):
    """/ui/api/report through replicas asks `optimization_report(model, load=False)`: a replica without the model
    answers None (it loads nothing, evicts nothing); the ingress waits at most ASK_TIMEOUT_S and cancels."""
    from engine.scaleout import remote as remote_mod
    from engine.scaleout.remote import RemoteEngine

    engine.load("tiny-sd15")
    assert engine.optimization_report("tiny-sd15", load=False) is engine.optimization_report("tiny-sd15")
    before = engine.loaded_models()
    if "tiny-flux" not in before:
        assert engine.optimization_report("tiny-flux", load=False) is None
        assert engine.loaded_models() == before

    class Response:
        def __init__(self, out=None):
            self.out, self.cancelled = out, False

        def result(self, timeout_s=None):
            if self.out is None:
                time.sleep(timeout_s)
                raise TimeoutError
            return self.out

        def cancel(self):
            self.cancelled = True

    class Method:
        def __init__(self, response):
            self.response = response

        def remote(self, *args):
            return self.response

    class Handle:
        def __init__(self, response):
            self.optimization_report = self.stats = Method(response)

    monkeypatch.setattr(remote_mod, "ASK_TIMEOUT_S", 0.2)
    silent = Response()
    t0 = time.monotonic()
    assert RemoteEngine(Handle(silent), replicas=1).optimization_report("tiny-sd15") is None
    assert silent.cancelled and time.monotonic() - t0 < 2
    busy = Response()
    assert RemoteEngine(Handle(busy), replicas=1).loaded_models() == [] and busy.cancelled
    lacking = Response({"result": None, "replica": "r0"})
    assert RemoteEngine(Handle(lacking), replicas=1).optimization_report("tiny-sd15") is None


def test_a_replica_without_the_model_reports_none_and_loads_nothing():
    class Unloaded(_StepEngine):
        def optimization_report(self, model, *, load=True):
            assert not load, "a replica's report look must not load"
            return None

    worker = _worker(Unloaded())
    assert asyncio.run(worker.optimization_report("tiny-sd15")) == {"result": None, "replica": "r0"}


def test_a_cancelled_request_of_a_replica_batch_drops_out_and_is_recorded_stopped(engine):
    """Batched replica path on a real engine: two same-shape streams run as one batch; one closed mid-run (Serve's
    cancel) drops out at its next step, recorded stopped, while the other finishes."""
    from engine.scaleout.batching import BatchConfig

    worker = _worker(engine, BatchConfig(max_batch_size=2, max_wait_s=0.5))

    async def consume(request, cancel_at=None):
        stream, messages = worker.generate_stream(request), []
        async for message in stream:
            messages.append(message)
            if cancel_at is not None and "step" in message and message["step"][0] >= cancel_at:
                await stream.aclose()
                return messages, False
        return messages, True

    async def main():
        long = [GenerateRequest(model="tiny-sd15", prompt=f"long {i}", width=64, height=64, num_inference_steps=20,
                                seed=i) for i in range(2)]
        return await asyncio.gather(consume(long[0], cancel_at=2), consume(long[1]))

    (_, first_done), (second, second_done) = asyncio.run(main())
    assert not first_done and second_done and "result" in second[-1]
    assert worker._batcher.batches == [2] and worker.cancelled == 1 and worker.done == 1
    record = worker.stopped[-1]
    assert record["stopped"] is True and 3 <= record["step"] < 20
