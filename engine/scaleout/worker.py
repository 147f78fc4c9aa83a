"""The Ray Serve deployment: one `Engine` per replica (`num_gpus=1` on GPU clusters).

Routing: a request with adapters carries its adapter-set key as Serve's multiplexed model id, so Serve's router
sends it to a replica that already holds (has fused) that set when one is free, else to the least loaded; the
"load" below is the engine applying the set on its first request there. Batching (optional): same-key requests
that arrive together run through `generate_batch` as one model call. Progress: `generate_stream` streams each
step (and the latents for previews) back to the ingress; cancelling the call stops the engine at its next step.
Health: Serve calls `check_health` periodically; a replica whose engine was closed or broken fails it and is
replaced. Imports ray: load it only when starting replicas (engine/scaleout/serve.py)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, AsyncIterator, Callable

from ray import serve

from ..errors import EngineError, JobCancelledError
from ..loading import TRUSTED, CallerPolicy, as_caller
from ..requests import GenerateRequest
from ..runtime.queue import error_record
from .batching import BatchConfig, KeyedBatcher
from .keys import batch_key

MAX_ADAPTER_SETS = 2  # per replica, as Serve's router sees it (the engine keeps one active set per model)
STOP_WAIT_S = 30.0  # a cancelled request's engine thread stops at its next step; wait at most this for it
KEEP_STOPPED = 16


class _Listener:
    """One request's step events, from the engine thread to the replica's streaming coroutine, and its stop flag
    (set when the Serve call is cancelled: the next step raises the engine's cancel error)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, previews: bool, on_count: Callable[[], None]):
        self.loop = loop
        self.previews = previews
        self.on_count = on_count
        self.events: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.reached = 0  # steps run for this request
        self.total = 0
        self.record: dict[str, Any] | None = None  # its entry in the replica's `stopped` list, once cancelled

    def on_step(self, i: int, n: int, latents: Any) -> None:
        """The engine's step callback (engine thread)."""
        if self.stop.is_set():
            if self.record is not None:
                self.record["stopped"] = True  # the engine (or its batch) dropped this request here
            raise JobCancelledError("request cancelled")
        self.reached, self.total = i + 1, n
        self.on_count()
        rows = latents.detach().to("cpu", copy=True) if self.previews and latents is not None else None
        self.loop.call_soon_threadsafe(self.events.put_nowait, (i, n, rows))

    async def follow(self, work: asyncio.Future) -> AsyncIterator[tuple[int, int, Any]]:
        """Step events as they come until `work` is done (then the ones already sent)."""
        while not work.done():
            getter = asyncio.ensure_future(self.events.get())
            try:
                await asyncio.wait([getter, work], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()
        while not self.events.empty():
            yield self.events.get_nowait()


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
        self.done = 0  # generate requests answered with a result
        self.failed = 0  # ... with an error
        self.cancelled = 0  # ... cancelled by the caller while running here
        self.steps = 0  # denoising steps run (a batch's step counts once per request)
        self.stopped: list[dict[str, Any]] = []  # the last cancelled requests: step reached of num_steps
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
    async def generate_stream(self, request: GenerateRequest, caller: CallerPolicy = TRUSTED,
                              previews: bool = False) -> AsyncIterator[dict[str, Any]]:
        """A streaming Serve call: {"started"} (where it runs), one {"step": (i, n, latents)} per denoising step
        (latents, on the CPU, only with `previews`: the ingress renders the preview as a single-process server
        does), then the final {"result"} or {"error"} with this replica's counters.

        `caller`: the ingress caller's policy (an HTTP caller is untrusted), applied to model and LoRA resolution
        here as in a single-process server; only same-policy requests batch together. Cancelling the call (Serve
        cancels this coroutine) stops the engine at its next step (`JobCancelledError` from the step callback), so
        the replica is free again within a step; a cancelled request of a batch drops out of it (see batched.py)."""
        key = await self._route_in()
        self.calls += 1
        listener = _Listener(asyncio.get_running_loop(), previews, self._count_step)
        yield {"started": True, **self._where(key)}
        if self._batcher is not None:
            work = asyncio.ensure_future(
                self._batcher.submit((batch_key(request), caller), (request, caller, listener)))
        else:
            work = asyncio.ensure_future(asyncio.to_thread(self._as(caller, self._generate), request, listener))
        # a cancelled request's outcome is not awaited by anyone: retrieve it so asyncio does not log it as lost
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        ended = False
        try:
            async for step in listener.follow(work):
                yield {"step": step}
            try:
                result = work.result()
            except EngineError as e:  # as data: engine errors take required arguments and do not unpickle
                self.failed += 1
                ended = True
                yield {"error": error_record(e), **self._where(key), "counters": await self._counters()}
                return
            except Exception:
                self.failed += 1
                ended = True
                raise
            self.done += 1
            ended = True
            yield {"result": result, **self._where(key), "model_calls": self.model_calls,
                   "counters": await self._counters()}
        finally:
            if not ended:  # cancelled by the caller (or the caller went away): stop at the next step
                # "stopped": True once the engine has let go of the request (it may finish later than this)
                listener.record = record = {"step": listener.reached, "num_steps": listener.total, "stopped": False}
                listener.stop.set()
                self.cancelled += 1
                self.stopped.append(record)
                del self.stopped[:-KEEP_STOPPED]
                if self._batcher is not None:
                    work.cancel()  # the batch goes on for the others; this request drops out at its next step
                else:
                    work.add_done_callback(lambda _: record.update(stopped=True))
                    await asyncio.wait([work], timeout=STOP_WAIT_S)  # the engine thread stops at its next step
                record["step"], record["num_steps"] = listener.reached, listener.total

    def _count_step(self) -> None:
        self.steps += 1

    def _where(self, key: str) -> dict[str, Any]:
        return {"replica": self.replica, "pid": self.pid, "adapters": key}

    async def _counters(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.counters)  # the engine's load lock may be held by a loading request

    def counters(self) -> dict[str, Any]:
        """This replica's running totals (sent with every final answer; the ingress exports them on /metrics)."""
        return {"calls": self.calls, "model_calls": self.model_calls, "done": self.done, "failed": self.failed,
                "cancelled": self.cancelled, "steps": self.steps,
                "batches": len(self._batcher.batches) if self._batcher else 0, "stopped": list(self.stopped),
                "loaded": self.engine.loaded_models()}

    def _generate(self, request: GenerateRequest, listener: "_Listener") -> Any:
        """One unbatched request (engine thread): a request cancelled while it waited for a thread does no engine
        work (no model load, no LoRA fusing)."""
        if listener.stop.is_set():
            raise JobCancelledError("request cancelled before it started")
        self.model_calls += 1
        return self.engine.generate(request, step_callback=listener.on_step)

    def _run_batch(self, items: list[tuple[GenerateRequest, CallerPolicy, "_Listener"]]) -> list[Any]:
        """A batch (engine thread): requests cancelled while they waited are left out of it (their result slot is
        the cancel error, which nobody awaits)."""
        from .batched import generate_batch

        live = [i for i, (_, _, listener) in enumerate(items) if not listener.stop.is_set()]
        results: list[Any] = [JobCancelledError("request cancelled before it started")] * len(items)
        if not live:
            return results
        self.model_calls += 1
        with as_caller(items[0][1]):  # one policy per batch (it is part of the batch key)
            outs = generate_batch(self.engine, [items[i][0] for i in live], [items[i][2].on_step for i in live])
        for i, out in zip(live, outs):
            results[i] = out
        return results

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

    async def optimization_report(self, model: str, caller: CallerPolicy = TRUSTED) -> dict[str, Any]:
        """This replica's compiler report for `model`, or None when the model is not loaded here (a look never loads
        a model, nor evicts one this replica serves). Replicas share engine settings, so their reports agree on
        passes and memory plan; compile_stats are this replica's."""
        report = self._as(caller, lambda: self.engine.optimization_report(model, load=False))
        try:
            return {"result": await asyncio.to_thread(report), "replica": self.replica}
        except EngineError as e:
            return {"error": error_record(e)}

    async def family(self, model: str, caller: CallerPolicy = TRUSTED) -> dict[str, Any]:
        try:
            return {"result": (await asyncio.to_thread(self._as(caller, self.engine.load), model)).family.name}
        except EngineError as e:
            return {"error": error_record(e)}

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": self.pid, **(await self._counters()),
                "batch_sizes": list(self._batcher.batches) if self._batcher else [],
                "adapter_sets": list(self.adapter_sets)}

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
