"""The Ray Serve deployment: one `Engine` per replica (`num_gpus=1` on GPU clusters).

Routing: a request with adapters carries its adapter-set key as Serve's multiplexed model id, so Serve's router
sends it to a replica that already holds (has fused) that set when one is free, else to the least loaded; the
"load" below is the engine applying the set on its first request there. Batching (optional): same-key requests
that arrive together run through `generate_batch` as one model call. Health: Serve calls `check_health`
periodically; a replica whose engine was closed or broken fails it and is replaced. Imports ray: load it only when
starting replicas (engine/scaleout/serve.py)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve

from ..errors import EngineError
from ..loading import TRUSTED, CallerPolicy, as_caller
from ..requests import GenerateRequest
from ..runtime.queue import error_record
from .batching import BatchConfig, KeyedBatcher
from .keys import batch_key

MAX_ADAPTER_SETS = 2  # per replica, as Serve's router sees it (the engine keeps one active set per model)


class EngineWorker:
    """One replica: an Engine, counters, and the adapter sets it holds."""

    def __init__(self, engine_kwargs: dict[str, Any], batching: BatchConfig | None = None,
                 preload: list[str] | None = None):
        from ..api import Engine

        self.engine = Engine(**engine_kwargs)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.pid = os.getpid()
        self.calls = 0  # requests served
        self.model_calls = 0  # engine calls (a batch is one)
        self.adapter_sets: list[str] = []
        self._batcher = KeyedBatcher(self._run_batch, batching) if batching is not None else None
        for model in preload or []:
            self.engine.load(model)

    # -- routing --------------------------------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTER_SETS)
    async def _hold_adapters(self, key: str) -> str:
        """Serve's "model load" for an adapter-set key: recorded here; the engine fuses the set on first use."""
        self.adapter_sets.append(key)
        return key

    async def _route_in(self) -> str:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._hold_adapters(key)
        return key

    # -- work -----------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest, caller: CallerPolicy = TRUSTED) -> dict[str, Any]:
        """`caller`: the ingress caller's policy (an HTTP caller is untrusted), applied to model and LoRA
        resolution here as in a single-process server; only same-policy requests batch together."""
        key = await self._route_in()
        self.calls += 1
        try:
            if self._batcher is not None:
                result = await self._batcher.submit((batch_key(request), caller), (request, caller))
            else:
                self.model_calls += 1
                result = await asyncio.to_thread(self._as(caller, self.engine.generate), request)
        except EngineError as e:  # as data: engine errors take required arguments and do not unpickle
            return {"error": error_record(e), "replica": self.replica, "pid": self.pid, "adapters": key}
        return {"result": result, "replica": self.replica, "pid": self.pid, "adapters": key,
                "model_calls": self.model_calls}

    def _run_batch(self, items: list[tuple[GenerateRequest, CallerPolicy]]) -> list[Any]:
        from .batched import generate_batch

        self.model_calls += 1
        with as_caller(items[0][1]):  # one policy per batch (it is part of the batch key)
            return generate_batch(self.engine, [request for request, _ in items])

    @staticmethod
    def _as(caller: CallerPolicy, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with as_caller(caller):
                return fn(*args, **kwargs)

        return run

    async def upscale(self, kwargs: dict[str, Any], caller: CallerPolicy = TRUSTED) -> dict[str, Any]:
        self.calls += 1
        self.model_calls += 1
        try:
            result = await asyncio.to_thread(self._as(caller, lambda: self.engine.upscale(**kwargs)))
        except EngineError as e:
            return {"error": error_record(e), "replica": self.replica, "pid": self.pid, "adapters": ""}
        return {"result": result, "replica": self.replica, "pid": self.pid, "adapters": ""}

    async def family(self, model: str, caller: CallerPolicy = TRUSTED) -> dict[str, Any]:
        try:
            return {"result": (await asyncio.to_thread(self._as(caller, self.engine.load), model)).family.name}
        except EngineError as e:
            return {"error": error_record(e)}

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": self.pid, "calls": self.calls, "model_calls": self.model_calls,
                "batches": list(self._batcher.batches) if self._batcher else [],
                "adapter_sets": list(self.adapter_sets), "loaded": self.engine.loaded_models()}

    def check_health(self) -> None:
        """Serve's periodic health check: the engine answers and its device runs a kernel (a lost or wedged GPU
        raises here); a failing replica is replaced."""
        import torch

        self.engine.loaded_models()
        probe = torch.ones(1, device=self.engine.device) + 1
        if float(probe.sum()) != 2.0:
            raise RuntimeError(f"device {self.engine.device} computes wrong results")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def deployment(*, replicas: int, min_replicas: int | None, max_replicas: int | None, num_gpus: float,
               num_cpus: float, max_ongoing: int, health_check_period_s: float = 5.0,
               health_check_timeout_s: float = 30.0) -> Any:
    """`EngineWorker` as a Serve deployment with these resources and replica bounds (autoscaling when min/max
    differ)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
        "max_ongoing_requests": max_ongoing,
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": health_check_timeout_s,
        "graceful_shutdown_timeout_s": 5.0,
    }
    lo = replicas if min_replicas is None else min_replicas
    hi = replicas if max_replicas is None else max_replicas
    if lo == hi:
        options["num_replicas"] = lo
    else:
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": replicas,
                                         "target_ongoing_requests": max(1, max_ongoing // 2)}
    return serve.deployment(EngineWorker, name="EngineWorker").options(**options)
