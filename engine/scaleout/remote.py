"""`RemoteEngine`: the Engine-shaped proxy the ingress's job queue drives. Each job's `engine.generate(...)` becomes a
call on the Serve deployment handle (routed by adapter set); the queue thread waits on it, checking the job's cancel
flag and deadline between polls (a cancelled or timed-out job cancels its remote call). A replica that dies under a
job fails that job with `replica_died` (503); Serve replaces the replica and the queue goes on with the rest.

Step progress is not forwarded across replicas: a job reports queued -> running -> done, and its log names the
replica that ran it."""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from ..errors import EngineError, ReplicaDiedError, RestoredJobError
from ..loading import caller_policy
from ..requests import GenerateRequest, Result, parse_request
from ..runtime.queue import JobContext, current_job
from .keys import adapter_key

POLL_S = 0.1


class _Loaded:
    """What `engine.load(model)` answers here: just the family (the endpoints' preview code asks for it)."""

    def __init__(self, family: str):
        self.family = type("Family", (), {"name": family})()


class RemoteEngine:
    """Runs `generate` / `upscale` on the replicas behind `handle` (a Serve `DeploymentHandle`)."""

    def __init__(self, handle: Any, *, replicas: int, poll_s: float = POLL_S):
        self.handle = handle
        self.replicas = replicas
        self.device = f"ray:{replicas}"
        self.allow_private_urls = False
        self.poll_s = poll_s
        self.per_replica: collections.Counter[str] = collections.Counter()  # jobs each replica finished
        self.placements: list[tuple[str, str]] = []  # (adapter key, replica) of each finished generate
        self._lock = threading.Lock()
        self._families: dict[str, str] = {}

    # -- the Engine surface the endpoints use ---------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, *, step_callback: Callable[..., Any] | None = None,
                 **kwargs: Any) -> Result:
        if request is None:
            request = parse_request(GenerateRequest, kwargs)
        key = adapter_key(request)
        method = self.handle.generate.options(multiplexed_model_id=key) if key else self.handle.generate
        out = self._wait(method.remote(request, caller_policy()))  # the replica resolves as this caller may
        with self._lock:
            self.placements.append((key, out["replica"]))
        return out["result"]

    def upscale(self, image: Any = None, **kwargs: Any) -> Any:
        return self._wait(self.handle.upscale.remote({"image": image, **kwargs}, caller_policy()))["result"]

    def load(self, model: str, **_: Any) -> _Loaded:
        if model not in self._families:
            self._families[model] = self._wait(self.handle.family.remote(model, caller_policy()),
                                               count=False)["result"]
        return _Loaded(self._families[model])

    def loaded_models(self) -> list[str]:
        return sorted(self._families)

    def close(self) -> None:
        pass

    # -- waiting ----------------------------------------------------------------------------------------------------
    def _wait(self, response: Any, count: bool = True) -> Any:
        from ray import exceptions as rex

        job = current_job()
        ctx = JobContext(job) if job is not None else None
        while True:
            try:
                out = response.result(timeout_s=self.poll_s)
                break
            except TimeoutError:
                pass
            except (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError) as e:
                raise ReplicaDiedError(f"the replica running this request died ({type(e).__name__}); it is being "
                                       "replaced: submit the request again") from None
            except rex.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                if isinstance(cause, EngineError):
                    raise cause from None
                raise
            if ctx is not None:
                try:
                    ctx.check()
                except BaseException:
                    response.cancel()
                    raise
        if isinstance(out, dict) and "error" in out:  # an engine error, sent as data: same type, status and body
            raise RestoredJobError(out["error"])
        if count and isinstance(out, dict) and "replica" in out:
            with self._lock:
                self.per_replica[out["replica"]] += 1
            if job is not None:
                job._log(f"ran on replica {out['replica']} (pid {out.get('pid')})")
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"replicas": self.replicas, "per_replica": dict(self.per_replica)}
