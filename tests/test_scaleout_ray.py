"""Scale-out on a local Ray cluster (2 CPUs, small object store, 2 replicas of tiny models, 2-step 64x64 images):
the in-process ingress (the real ASGI app over TLS, one queue) drives Ray Serve replicas, reached by the unmodified
fal client. 40 requests spread over both replicas and equal the single-process results for the same seeds; a replica
killed mid-run is replaced, its running job fails as `replica_died` and the rest finish; requests with adapters go
back to the replica holding their adapter set; replicas stream step progress and previews to the ingress, a
cancelled job stops its replica's engine at the next step (also within a batch, where only it drops out), /metrics
counts jobs per replica and /ui/api/report carries a replica's optimization report. Skipped without Ray
(`pip install 'engine[ray]'`).

fal_client reads FAL_RUN_HOST at import, so the port is chosen before the import (as in test_server.py), and the
fixture patches the client's URL constants for a full run where another module imported it first."""

import base64
import collections
import io
import os
import threading
import time

import pytest
from PIL import Image
from serving import free_port, point_fal_client


PORT = free_port()
API_KEY = "scaleout-key"
os.environ["FAL_RUN_HOST"] = f"127.0.0.1:{PORT}"
os.environ["FAL_QUEUE_RUN_HOST"] = f"127.0.0.1:{PORT}/queue"
os.environ["FAL_KEY"] = API_KEY

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'engine[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'engine[ray]'")
fal_client = pytest.importorskip("fal_client")
trustme = pytest.importorskip("trustme")
uvicorn = pytest.importorskip("uvicorn")

from conftest import images_close  # noqa: E402

APP = "fal-ai/stable-diffusion-v1-5"
ENDPOINTS = {APP: "tiny-sd15"}
ARGS = {"width": 64, "height": 64, "num_inference_steps": 2, "sync_mode": True, "format": "png"}


def decode(image_obj: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image_obj["url"].split(",", 1)[1]))).convert("RGB")


class Cluster:
    def __init__(self, remote, app, ca_file):
        self.remote, self.app, self.ca_file = remote, app, ca_file

    @property
    def service(self):
        return self.app.state.service


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from engine.scaleout.serve import ScaleoutConfig, queue_for_replicas, start_replicas, stop_replicas
    from engine.server.app import create_app

    tmp = tmp_path_factory.mktemp("scaleout")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))

    config = ScaleoutConfig(replicas=2, ray_cpus=2, num_cpus=0.5, object_store_bytes=128 * 1024 * 1024,
                            engine_kwargs={"device": "cpu"}, preload=("tiny-sd15",))
    remote = start_replicas(config)
    server = None
    try:
        queue_for_replicas(remote, config, str(tmp / "state"), retention_s=600, max_jobs=None, max_bytes=None)
        app = create_app(remote, api_key=API_KEY, endpoint_overrides=ENDPOINTS, state_dir=str(tmp / "state"))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, ssl_certfile=str(cert_file),
                                               ssl_keyfile=str(key_file), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "ingress did not start"
            time.sleep(0.05)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SSL_CERT_FILE", str(ca_file))
            point_fal_client(mp, f"127.0.0.1:{PORT}", API_KEY)  # also when another module imported fal_client first
            yield Cluster(remote, app, ca_file)
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(0.5)
        stop_replicas()


@pytest.fixture(scope="module")
def local_service():
    """The single-process path (`engine serve` without replicas): the same endpoints over a local Engine."""
    from engine import Engine
    from engine.service import FalService

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica runs (Ray gives a 1-CPU actor one thread): the same float sums
    engine = Engine(device="cpu")
    try:
        with FalService(engine, endpoint_overrides=ENDPOINTS, trusted=True) as service:
            yield service
    finally:
        engine.close()
        torch.set_num_threads(threads)


def _replica_actors() -> list[str]:
    """Names of the live worker replicas' actors (Serve names them after the app and deployment)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "EngineWorker" in a["name"]]
    return sorted(names)


def _wait_replicas(n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(_replica_actors()) < n:
        assert time.monotonic() < deadline, f"Serve did not bring {n} replicas back"
        time.sleep(0.5)


def test_40_requests_spread_over_both_replicas_and_equal_single_process(cluster, local_service):
    before = dict(cluster.remote.per_replica)
    handles = [fal_client.submit(APP, {"prompt": f"a lighthouse {i % 4}", "seed": i, **ARGS}) for i in range(40)]
    results = [h.get() for h in handles]
    served = {k: v - before.get(k, 0) for k, v in cluster.remote.per_replica.items()}
    assert sum(served.values()) == 40 and len([v for v in served.values() if v > 0]) == 2, served
    exact = 0
    for i, out in enumerate(results):
        assert out["seed"] == i
        want = local_service.run(APP, {"prompt": f"a lighthouse {i % 4}", "seed": i, **ARGS})
        ok, frac = images_close([decode(out["images"][0])], [decode(want["images"][0])])
        assert ok, (i, frac)
        exact += decode(out["images"][0]).tobytes() == decode(want["images"][0]).tobytes()
    assert exact == 40, exact
    status = fal_client.status(APP, handles[0].request_id, with_logs=True)  # the ingress's one queue knows each job
    assert isinstance(status, fal_client.Completed) and any("ran on replica" in e["message"] for e in status.logs)


def _running_replica(handles, timeout: float = 60) -> tuple[int, str]:
    """(index, replica id) of a job in progress, as its queue logs name the replica running it."""
    deadline = time.monotonic() + timeout
    while True:
        for i, h in enumerate(handles):
            status = fal_client.status(APP, h.request_id, with_logs=True)
            if isinstance(status, fal_client.InProgress):
                named = [e["message"].split()[3] for e in status.logs or ()
                         if e["message"].startswith("running on replica ")]
                if named:
                    return i, named[-1]
        assert time.monotonic() < deadline, "no job started on a replica"
        time.sleep(0.05)


def test_killed_replica_is_replaced_and_only_its_running_job_fails(cluster):
    # 50 steps at 128x128: over 1 s a job on one CPU thread, so the job seen running still runs when its replica goes
    slow = {**ARGS, "num_inference_steps": 50, "width": 128, "height": 128}
    handles = [fal_client.submit(APP, {"prompt": f"slow {i}", "seed": i, **slow})
               for i in range(6)]
    running, replica = _running_replica(handles)
    victim = next(name for name in _replica_actors() if name.endswith(replica))
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    finals = []
    for h in handles:
        for event in h.iter_events(interval=0.2):
            pass
        finals.append(event)
    kinds = [f.error_type for f in finals]
    died = [k for k in kinds if k == "replica_died"]
    assert 1 <= len(died) <= 2 and all(k in (None, "replica_died") for k in kinds), kinds
    assert kinds.count(None) >= 4, kinds  # queued jobs went on to the surviving (and the new) replica
    assert finals[running].error_type == "replica_died" and "replica" in finals[running].error, finals[running]
    _wait_replicas(2)
    out = fal_client.run(APP, {"prompt": "after", "seed": 1, **ARGS})
    assert decode(out["images"][0]).size == (64, 64)


def test_adapter_sets_route_back_to_the_replica_that_holds_them(cluster, tmp_path):
    from engine.requests import GenerateRequest
    from test_lora import make_lora

    _wait_replicas(2)
    paths = {name: str(make_lora(tmp_path / f"{name}.safetensors", seed, family="sd15"))
             for name, seed in (("a", 11), ("b", 12))}

    def run(name, seed):
        request = GenerateRequest(model="tiny-sd15", prompt="x", width=64, height=64, num_inference_steps=2,
                                  seed=seed, loras=[{"path": paths[name]}])
        return cluster.remote.generate(request)

    start = len(cluster.remote.placements)
    run("a", 0)
    run("b", 0)
    time.sleep(1.5)  # the replicas report the adapter sets they now hold to Serve's router
    home = {key: replica for key, replica in cluster.remote.placements[start:start + 2]}
    assert len(home) == 2
    for i in range(6):
        run("ab"[i % 2], i)
    after = cluster.remote.placements[start + 2:]
    assert len(after) == 6 and all(home[key] == replica for key, replica in after), (home, after)


def test_engine_errors_in_a_replica_keep_their_type(cluster):
    """An error the replica's engine raises on purpose reaches the ingress as that error (422 invalid_request),
    not as a wrapped Ray task error."""
    from engine.errors import EngineError
    from engine.requests import GenerateRequest
    from engine.server.app import error_body

    _wait_replicas(2)
    request = GenerateRequest(model="tiny-sd15", prompt="x", width=64, height=64, num_inference_steps=2,
                              scheduler="no-such-scheduler")
    with pytest.raises(EngineError) as info:
        cluster.remote.generate(request)
    error = info.value
    assert (error.error_type, error.http_status) == ("invalid_request", 422) and "scheduler" in str(error)
    body = error_body(error)
    assert body["error_type"] == "invalid_request" and body["detail"][0]["loc"][:2] == ["body", "scheduler"]

def test_the_callers_policy_travels_to_the_replica(cluster, tmp_path):
    """Model and LoRA resolution in a replica sees the ingress caller's policy: an untrusted caller's local LoRA
    path is refused there (422) exactly as in the single-process server; a trusted caller's is loaded."""
    from engine.errors import EngineError
    from engine.loading import CallerPolicy, as_caller
    from engine.requests import GenerateRequest
    from test_lora import make_lora

    path = str(make_lora(tmp_path / "c.safetensors", 13, family="sd15"))
    request = GenerateRequest(model="tiny-sd15", prompt="x", width=64, height=64, num_inference_steps=2, seed=1,
                              loras=[{"path": path}])
    with as_caller(CallerPolicy(trusted=False)), pytest.raises(EngineError) as info:
        cluster.remote.generate(request)
    assert (info.value.error_type, info.value.http_status) == ("refused_source", 422)
    assert "loras.0.path" in str(info.value)
    assert cluster.remote.generate(request).images[0].size == (64, 64)

def _http(cluster):
    import httpx

    return httpx.Client(base_url=f"https://127.0.0.1:{PORT}", verify=str(cluster.ca_file),
                        headers={"Authorization": f"Key {API_KEY}"}, timeout=30)


def _log_messages(handle) -> list[str]:
    """The request's log messages so far (none while it is still queued: `Queued` carries no logs)."""
    status = fal_client.status(APP, handle.request_id, with_logs=True)
    return [e["message"] for e in (getattr(status, "logs", None) or [])]


def _final(handle, timeout: float = 120):
    """The request's last status (Completed), waiting at most `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        status = fal_client.status(APP, handle.request_id, with_logs=True)
        if isinstance(status, fal_client.Completed):
            return status
        assert time.monotonic() < deadline, f"{handle.request_id} did not finish in {timeout} s"
        time.sleep(0.1)


def test_stream_through_replicas_sends_each_step_with_a_preview(cluster, local_service):
    """The replica streams every denoising step (with the latents when previews are wanted) and the ingress turns
    them into the same progress events, previews and step logs a single-process server sends."""
    _wait_replicas(2)
    args = {"prompt": "a kite", "seed": 3, **ARGS, "num_inference_steps": 3}
    events = list(fal_client.stream(APP, args))
    want = list(local_service.stream(APP, args))
    progress, result = events[:-1], events[-1]
    steps = [(e["type"], e["step"], e["num_steps"]) for e in progress]
    assert steps == [(e["type"], e["step"], e["num_steps"]) for e in want[:-1]] and len(steps) >= 3, steps
    for event, local in zip(progress, want):
        preview = Image.open(io.BytesIO(base64.b64decode(event["preview"]["url"].split(",", 1)[1])))
        assert preview.mode == "RGB" and preview.size == (local["preview"]["width"], local["preview"]["height"])
    assert decode(result["images"][0]).tobytes() == decode(want[-1]["images"][0]).tobytes()
    handle = fal_client.submit(APP, {**args, "seed": 4})
    messages = [entry["message"] for entry in _final(handle).logs]
    n = steps[-1][2]
    assert [m for m in messages if m.startswith("step ")] == [f"step {i}/{n}" for i in range(1, n + 1)], messages
    assert any(m.startswith("running on replica") for m in messages)


def test_a_direct_callers_step_callback_sees_every_step_of_the_replica(cluster):
    """Outside a job (no previews wanted) each step still reaches the callback, without latents."""
    from engine.requests import GenerateRequest

    seen = []
    request = GenerateRequest(model="tiny-sd15", prompt="x", width=64, height=64, num_inference_steps=3, seed=2)
    result = cluster.remote.generate(request, step_callback=lambda i, n, latents: seen.append((i, n, latents)))
    n = seen[-1][1]
    assert [(i, k) for i, k, _ in seen] == [(i, n) for i in range(n)] and n >= 3
    assert all(latents is None for _, _, latents in seen) and result.images[0].size == (64, 64)


def test_cancelling_a_running_job_stops_the_replica_at_its_next_step(cluster):
    """A long job cancelled mid-run: status cancelled, the replica's engine stopped well before its last step (its
    own counters say so: the step its engine thread reached when it ended), and the next jobs run on it."""
    _wait_replicas(2)
    steps = 50  # the endpoint's most; at 384x384 a replica needs about 10 s for them
    handle = fal_client.submit(APP, {"prompt": "long", "seed": 5, **ARGS, "width": 384, "height": 384,
                                     "num_inference_steps": steps})
    deadline = time.monotonic() + 90
    while True:
        logs = _log_messages(handle)
        if any(m.startswith("step 3/") for m in logs):
            break
        assert time.monotonic() < deadline, logs
        time.sleep(0.05)
    replica = next(m for m in logs if m.startswith("running on replica")).split()[3]
    cancelled_before = cluster.remote.reported.get(replica, {}).get("cancelled", 0)
    handle.cancel()
    cancelled_at = time.monotonic()
    final = _final(handle, timeout=30)
    assert final.error_type == "cancelled"
    assert len([e for e in final.logs if e["message"].startswith("step ")]) < steps
    # the next jobs: one per replica at once (each replica takes one job), until the cancelled one has reported
    for _ in range(5):
        quick = [fal_client.submit(APP, {"prompt": "next", "seed": i, **ARGS}) for i in range(2)]
        assert all(_final(h, timeout=60).error is None for h in quick)
        if cluster.remote.reported.get(replica, {}).get("cancelled", 0) > cancelled_before:
            break
    counters = cluster.remote.reported[replica]
    assert time.monotonic() - cancelled_at < 60
    stop = counters["stopped"][-1]
    assert stop["stopped"] and 3 <= stop["step"] < stop["num_steps"] // 2, stop  # the engine thread ended early
    assert counters["cancelled"] == cancelled_before + 1
    assert cluster.remote.replica_stats()[replica]["jobs_cancelled"] >= 1


def _replica_samples(text: str, metric: str) -> dict[tuple[str, str], float]:
    """{(replica, outcome or ""): value} of one counter family in Prometheus text."""
    import re

    out = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            out[(labels["replica"], labels.get("outcome", ""))] = float(line.rsplit(" ", 1)[1])
    return out


def test_metrics_count_jobs_per_replica(cluster):
    """/metrics labels jobs done by replica (and each replica's own model calls and steps): after N requests the
    per-replica deltas sum to N, each replica's delta the jobs whose log says they ran there."""
    _wait_replicas(2)
    with _http(cluster) as http:
        before = _replica_samples(http.get("/metrics").text, "engine_replica_jobs_total")
        steps_before = _replica_samples(http.get("/metrics").text, "engine_replica_denoise_steps_total")
        n = 8
        handles = [fal_client.submit(APP, {"prompt": f"count {i}", "seed": i, **ARGS}) for i in range(n)]
        finals = [_final(h) for h in handles]
        assert all(f.error is None for f in finals)
        text = http.get("/metrics").text
    ran_on = collections.Counter(e["message"].split()[3] for f in finals for e in f.logs
                                 if e["message"].startswith("ran on replica"))
    after = _replica_samples(text, "engine_replica_jobs_total")
    done = {r: v - before.get((r, o), 0.0) for (r, o), v in after.items() if o == "done"}
    assert sum(done.values()) == n and {r: v for r, v in done.items() if v} == ran_on, (done, ran_on)
    steps = _replica_samples(text, "engine_replica_denoise_steps_total")
    grown = sum(v - steps_before.get(k, 0.0) for k, v in steps.items())
    assert grown >= n * ARGS["num_inference_steps"], (steps_before, steps)
    assert all(v > 0 for v in _replica_samples(text, "engine_replica_model_calls_total").values())


def test_ui_report_through_replicas_has_the_replicas_optimization_report(cluster, local_service):
    """/ui/api/report through replicas: the model is loaded there (preloaded) and its report comes from a replica;
    replicas run the engine's defaults on CPU, so the passes match a local engine's."""
    _wait_replicas(2)
    cluster.remote.reported.clear()  # what is loaded is asked of a replica, not only taken from past jobs
    with _http(cluster) as http:
        body = http.get("/ui/api/report", params={"app": APP}).json()
    entry = next(m for m in body["models"] if m["model"] == "tiny-sd15")
    assert entry["loaded"], body
    report = entry["report"]
    want = local_service.engine.optimization_report("tiny-sd15").as_dict()
    assert report["device"] == want["device"] and report["config_hash"] == want["config_hash"]
    assert [(p["name"], p["status"]) for p in report["passes"]] == [(p["name"], p["status"]) for p in want["passes"]]


def test_batching_on_a_replica_runs_fewer_model_calls_with_equal_images(cluster, local_service):
    """Redeploys the app as 1 replica batching up to 8 (last in this module): 8 concurrent same-shape requests."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.requests import GenerateRequest
    from engine.scaleout.batching import BatchConfig
    from engine.scaleout.serve import ScaleoutConfig, start_replicas

    config = ScaleoutConfig(replicas=1, num_cpus=0.5, batching=BatchConfig(max_batch_size=8, max_wait_s=0.5),
                            engine_kwargs={"device": "cpu"}, preload=("tiny-sd15",))
    remote = start_replicas(config)
    requests = [GenerateRequest(model="tiny-sd15", prompt=f"boat {i}", width=64, height=64, num_inference_steps=2,
                                seed=50 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(remote.generate, requests))
    sizes = [r.extra.get("batch_size", 1) for r in results]
    batches = sum(1 / s for s in sizes)
    assert max(sizes) > 1 and batches < 8, sizes
    for request, result in zip(requests, results):
        want = local_service.engine.generate(request)
        ok, frac = images_close(result.images, want.images)
        assert ok and result.seed == request.seed, frac


def test_a_batch_streams_steps_to_each_request_and_a_cancelled_one_drops_out(cluster, local_service):
    """After the redeploy above (1 replica batching up to 8, which the ingress now reaches): two same-shape streams
    run as one batch and each gets every step with its own preview; then in a batch of two long jobs one is
    cancelled mid-run: it ends cancelled while the other finishes with its own image."""
    from concurrent.futures import ThreadPoolExecutor

    _wait_replicas(1)
    args = [{"prompt": f"duo {i}", "seed": 70 + i, **ARGS, "num_inference_steps": 3} for i in range(2)]
    before = cluster.remote.handle.stats.remote().result(timeout_s=30)  # the one replica's own counters
    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda a: list(fal_client.stream(APP, a)), args))
    after = cluster.remote.handle.stats.remote().result(timeout_s=30)
    assert after["replica"] == before["replica"] and after["batch_sizes"][len(before["batch_sizes"]):] == [2], after
    for a, events in zip(args, streams):
        want = list(local_service.stream(APP, a))
        assert [(e["step"], e["num_steps"]) for e in events[:-1]] == [(e["step"], e["num_steps"]) for e in want[:-1]]
        assert all(e["preview"]["url"].startswith("data:image/jpeg") for e in events[:-1])
        ok, frac = images_close([decode(events[-1]["images"][0])], [decode(want[-1]["images"][0])])
        assert ok, frac

    long = {**ARGS, "width": 256, "height": 256, "num_inference_steps": 50}
    handles = [fal_client.submit(APP, {"prompt": f"long {i}", "seed": 80 + i, **long}) for i in range(2)]
    deadline = time.monotonic() + 90
    while not all(any(m.startswith("step 3/") for m in _log_messages(h)) for h in handles):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    handles[0].cancel()
    first, second = _final(handles[0], timeout=30), _final(handles[1], timeout=120)
    assert first.error_type == "cancelled" and second.error is None
    assert len([e for e in second.logs if e["message"].startswith("step ")]) > 40
    stats = cluster.remote.handle.stats.remote().result(timeout_s=30)
    assert stats["batch_sizes"][len(after["batch_sizes"]):] == [2] and stats["cancelled"] == 1, stats
    out = handles[1].get()
    want = local_service.run(APP, {"prompt": "long 1", "seed": 81, **long})
    ok, frac = images_close([decode(out["images"][0])], [decode(want["images"][0])])
    assert ok, frac


def test_deployment_options_fixed_and_autoscaling():
    """Replica bounds become Serve options: equal bounds a fixed count, different ones an autoscaling config; the
    ingress queue takes as many jobs at once as the replicas (times the batch size) can."""
    from engine.scaleout.batching import BatchConfig
    from engine.scaleout.serve import ScaleoutConfig
    from engine.scaleout.worker import deployment

    fixed = deployment(replicas=2, min_replicas=None, max_replicas=None, num_gpus=1, num_cpus=2, max_ongoing=1)
    assert fixed.num_replicas == 2 and fixed.ray_actor_options["num_gpus"] == 1
    assert fixed._deployment_config.health_check_period_s == 5.0
    auto = deployment(replicas=2, min_replicas=1, max_replicas=4, num_gpus=1, num_cpus=2, max_ongoing=8)
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 2)
    assert ScaleoutConfig(replicas=2).in_flight == 2
    assert ScaleoutConfig(replicas=2, max_replicas=4, batching=BatchConfig(8)).in_flight == 32
