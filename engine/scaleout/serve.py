"""Start the replicas and build the ingress: `engine serve --replicas N`.

The ingress is the existing ASGI app (engine/server/app.py) in this process: one job queue, one durable job store,
so status/result/cancel work whichever replica ran a job. Its queue runs as many jobs at once as the replicas can
take (`replicas x per_replica`), each handed to the Serve deployment (engine/scaleout/worker.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import EngineError
from .batching import BatchConfig

APP_NAME = "engine"


class RayMissingError(EngineError):
    error_type = "ray_missing"


@dataclass(frozen=True)
class ScaleoutConfig:
    """How many replicas, with what, and how Ray is started when this process starts it."""

    replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_gpus: float = 0.0  # per replica; `for_device` picks 1 on CUDA
    num_cpus: float = 1.0
    per_replica: int = 1  # jobs in flight per replica (more with batching: they form the batches)
    batching: BatchConfig | None = None
    address: str | None = None  # an existing cluster ("auto", "ray://..."); None: start a local one
    ray_cpus: int | None = None  # local cluster only
    object_store_bytes: int | None = 256 * 1024 * 1024  # local cluster only
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")

    @property
    def in_flight(self) -> int:
        top = self.max_replicas or self.replicas
        return top * (self.batching.max_batch_size if self.batching else self.per_replica)


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise RayMissingError(f"replicas need Ray Serve ({e.name} is missing): pip install 'engine[ray]'") from None


def start_replicas(config: ScaleoutConfig) -> Any:
    """Ray (local unless `config.address`) + the worker deployment; returns the `RemoteEngine` over its handle."""
    require_ray()
    import ray
    from ray import serve

    from .remote import RemoteEngine
    from .worker import deployment

    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=config.ray_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=config.object_store_bytes,
                     runtime_env={"env_vars": _passed_env()})
    serve.start(proxy_location="Disabled")  # no Serve HTTP proxy: the ingress is this process's app
    worker = deployment(replicas=config.replicas, min_replicas=config.min_replicas,
                        max_replicas=config.max_replicas, num_gpus=config.num_gpus, num_cpus=config.num_cpus,
                        max_ongoing=config.batching.max_batch_size if config.batching else config.per_replica)
    handle = serve.run(worker.bind(config.engine_kwargs, config.batching, list(config.preload)), name=APP_NAME,
                       route_prefix=None)
    return RemoteEngine(handle, replicas=config.replicas)


def stop_replicas(shutdown_ray: bool = True) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()


def queue_for_replicas(remote: Any, config: ScaleoutConfig, state: Any, *, retention_s: float | None,
                       max_jobs: int | None, max_bytes: int | None) -> Any:
    """The ingress's one job queue over `remote`, running `config.in_flight` jobs at once (registered as the
    remote engine's queue, so `create_app(remote, ...)` uses it)."""
    from ..runtime.jobstore import JobStore
    from ..runtime.queue import JobQueue, queue_for

    store = state if isinstance(state, JobStore) else JobStore(state)
    kwargs: dict[str, Any] = {}
    if max_jobs is not None:
        kwargs["max_jobs"] = max_jobs
    if max_bytes is not None:
        kwargs["max_bytes"] = max_bytes
    return queue_for(remote, lambda: JobQueue(name=remote.device, workers=config.in_flight, store=store,
                                              retention_s=retention_s or 3600.0, **kwargs))


def _passed_env() -> dict[str, str]:
    """What replicas need from this process's environment: the engine's cache dir and import path."""
    keep = ("ENGINE_CACHE_DIR", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keep if k in os.environ}


def add_scaleout_arguments(parser: Any) -> None:
    """`engine serve` flags for replicas (they only matter with --replicas or --ray)."""
    group = parser.add_argument_group("scale-out (Ray Serve; pip install 'engine[ray]')")
    group.add_argument("--replicas", type=int, help="run the engine in N Ray Serve replicas (one engine each) behind "
                       "this server's one queue")
    group.add_argument("--ray", action="store_true", help="use Ray Serve replicas (default 1 unless --replicas)")
    group.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    group.add_argument("--min-replicas", type=int, help="autoscale from this many replicas")
    group.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    group.add_argument("--gpus-per-replica", type=float, help="default: 1 when CUDA is visible, else 0")
    group.add_argument("--cpus-per-replica", type=float, default=1.0)
    group.add_argument("--batch-size", type=int, default=1, help="batch up to this many same-shape requests per "
                       "model call (1: no batching)")
    group.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")


def wants_replicas(args: Any) -> bool:
    return bool(getattr(args, "replicas", None) or getattr(args, "ray", False))


def config_from_args(args: Any, engine_kwargs: dict[str, Any]) -> ScaleoutConfig:
    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() and str(args.device) in ("auto", "cuda") else 0.0
    batching = BatchConfig(args.batch_size, args.batch_wait_ms / 1000.0) if args.batch_size > 1 else None
    return ScaleoutConfig(replicas=args.replicas or 1, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          num_gpus=gpus, num_cpus=args.cpus_per_replica, batching=batching, address=args.ray_address,
                          engine_kwargs=engine_kwargs)
