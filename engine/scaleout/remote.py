"""`RemoteEngine`: the Engine-shaped proxy the ingress's job queue drives. Each job's `engine.generate(...)` becomes a
streaming call on the Serve deployment handle (routed by adapter set): the replica sends where it runs, each
denoising step (with the latents when the job wants previews), then the result. Every step reaches the caller's
`step_callback`, so a job's status, logs and SSE stream show the same progress events and previews as in a
single-process server. The queue thread waits on the stream in bounded polls, checking the job's cancel flag and
deadline between them; a cancelled or timed-out job cancels its remote call, which stops the replica's engine at its
next step. A replica that dies under a job fails that job with `replica_died` (503); Serve replaces the replica and
the queue goes on with the rest.

Per-replica counters (jobs done/failed/cancelled as the ingress saw them, and each replica's own model calls, steps
and batches as last reported) are `replica_stats()`, which the server's /metrics exports when the engine has it."""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable, Iterator

from ..errors import EngineError, JobCancelledError, JobTimeoutError, ReplicaDiedError, RestoredJobError
from ..loading import caller_policy
from ..requests import GenerateRequest, Result, parse_request
from ..runtime.queue import JobContext, current_job
from .keys import adapter_key

POLL_S = 0.1
ASK_TIMEOUT_S = 5.0  # for lookups outside a job (which models are loaded)
OUTCOMES = ("done", "failed", "cancelled")
REPORTED = ("model_calls", "steps", "batches")  # each replica's own running totals, as it last sent them
_END = object()


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
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.reported: dict[str, dict[str, Any]] = {}  # replica -> the counters it sent last
        self._lock = threading.Lock()
        self._families: dict[str, str] = {}

    # -- the Engine surface the endpoints use ---------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, *, step_callback: Callable[..., Any] | None = None,
                 **kwargs: Any) -> Result:
        """`step_callback(i, n, latents)` runs here for each step the replica ran; `latents` (on the CPU) only when
        the current job streams previews, else None (previews are the only use of them across a replica)."""
        if request is None:
            request = parse_request(GenerateRequest, kwargs)
        key = adapter_key(request)
        job = current_job()
        # latents travel only for a job that streams previews; other step callbacks get None for them
        previews = bool(step_callback is not None and job is not None and job.want_previews)
        handle = self.handle.options(stream=True, multiplexed_model_id=key) if key else \
            self.handle.options(stream=True)
        # the replica resolves models and LoRAs as this caller may
        stream = handle.generate_stream.remote(request, caller_policy(), previews)
        replica, final = None, None
        messages = self._follow(stream)
        try:
            for message in messages:
                if "started" in message:
                    replica = message["replica"]
                    if job is not None:
                        job._log(f"running on replica {replica} (pid {message.get('pid')})")
                elif "step" in message:
                    if step_callback is not None:
                        step_callback(*message["step"])
                else:
                    final = message
        except (JobCancelledError, JobTimeoutError):
            self._count(replica, "cancelled")
            raise
        except BaseException:
            self._count(replica, "failed")
            raise
        finally:
            messages.close()  # leaving early cancels the remote call (and so the replica's engine)
        if final is None:
            self._count(replica, "failed")
            raise ReplicaDiedError("the replica's stream ended without a result; submit the request again")
        self._report(final)
        if "error" in final:  # an engine error, sent as data: same type, status and body
            self._count(replica, "failed")
            raise RestoredJobError(final["error"])
        self._count(replica, "done")
        with self._lock:
            self.per_replica[final["replica"]] += 1
            self.placements.append((key, final["replica"]))
        if job is not None:
            job._log(f"ran on replica {final['replica']} (pid {final.get('pid')})")
        return final["result"]

    def upscale(self, image: Any = None, **kwargs: Any) -> Any:
        return self._wait(self.handle.upscale.remote({"image": image, **kwargs}, caller_policy()))["result"]

    def load(self, model: str, **_: Any) -> _Loaded:
        if model not in self._families:
            self._families[model] = self._wait(self.handle.family.remote(model, caller_policy()),
                                               count=False)["result"]
        return _Loaded(self._families[model])

    def loaded_models(self) -> list[str]:
        """Models loaded on the replicas: one replica asked now (bounded wait), and each as it last reported."""
        response = self.handle.stats.remote()
        try:
            now = set(response.result(timeout_s=ASK_TIMEOUT_S).get("loaded", ()))
        except Exception:  # noqa: BLE001 - busy or replaced replicas: what they reported last still counts
            response.cancel()  # a call left waiting would hold a replica slot (and pile up under polling)
            now = set()
        with self._lock:
            reported = {m for counters in self.reported.values() for m in counters.get("loaded", ())}
        return sorted(now | reported | set(self._families))

    def optimization_report(self, model: str, *, load: bool = False) -> Any:
        """The compiler report of one replica (whichever Serve routes to; replicas share engine settings, so passes
        and memory plan agree, while compile_stats are that replica's own), or None when that replica does not
        have `model` loaded or does not answer within `ASK_TIMEOUT_S`. A look never loads: `load` is accepted for
        the Engine's signature and ignored."""
        response = self.handle.optimization_report.remote(model, caller_policy())
        try:
            out = response.result(timeout_s=ASK_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            return None
        except Exception as e:  # noqa: BLE001 - a lost replica reads as replica_died
            from ray import exceptions as rex

            raise _mapped(e, rex) from None
        if "error" in out:  # an engine error, sent as data: same type, status and body
            raise RestoredJobError(out["error"])
        return out["result"]

    def close(self) -> None:
        pass

    # -- waiting ----------------------------------------------------------------------------------------------------
    def _follow(self, stream: Any) -> Iterator[dict[str, Any]]:
        """The stream's messages. A daemon thread iterates it (its `next` has no timeout) into a queue this thread
        polls, checking the job's cancel flag and deadline between polls; leaving early (cancel, deadline, a step
        callback that raised) cancels the remote call."""
        from ray import exceptions as rex

        job = current_job()
        ctx = JobContext(job) if job is not None else None
        box: queue.Queue = queue.Queue()

        def pump() -> None:
            try:
                for message in stream:
                    box.put(message)
                box.put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                box.put(e)

        threading.Thread(target=pump, name="engine-replica-stream", daemon=True).start()
        ended = False
        try:
            while True:
                if ctx is not None:
                    ctx.check()
                try:
                    item = box.get(timeout=self.poll_s)
                except queue.Empty:
                    continue
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise _mapped(item, rex)
                yield item
        finally:
            if not ended:
                stream.cancel()

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
            except Exception as e:
                raise _mapped(e, rex) from None
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

    # -- counters ---------------------------------------------------------------------------------------------------
    def _count(self, replica: str | None, outcome: str) -> None:
        with self._lock:
            self.outcomes[replica or "unassigned"][outcome] += 1

    def _report(self, final: dict[str, Any]) -> None:
        """Keep a replica's newest counters: jobs' threads here may hand in two answers of one replica out of order,
        and an older snapshot must not roll its totals back (a Prometheus counter only grows)."""
        if "counters" in final and "replica" in final:
            counters = final["counters"]
            with self._lock:
                old = self.reported.get(final["replica"])
                if old is None or _progress(counters) >= _progress(old):
                    self.reported[final["replica"]] = counters

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"replicas": self.replicas, "per_replica": dict(self.per_replica)}

    def replica_stats(self) -> dict[str, dict[str, float]]:
        """Per replica: jobs done/failed/cancelled (as the ingress saw them) and the replica's own model calls,
        denoising steps and batches (as it last reported): what /metrics exports, labelled by replica."""
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for replica in set(self.outcomes) | set(self.reported):
                row = {f"jobs_{o}": float(self.outcomes[replica][o]) if replica in self.outcomes else 0.0
                       for o in OUTCOMES}
                counters = self.reported.get(replica, {})
                row.update({name: float(counters.get(name, 0)) for name in REPORTED})
                out[replica] = row
            return out


def _mapped(error: BaseException, rex: Any) -> BaseException:
    """A Ray error as the engine's: a lost replica is `replica_died`; an engine error raised there is itself."""
    if isinstance(error, (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError)):
        return ReplicaDiedError(f"the replica running this request died ({type(error).__name__}); it is being "
                                "replaced: submit the request again")
    if isinstance(error, rex.RayTaskError):
        cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
        if isinstance(cause, EngineError):
            return cause
    return error


def _progress(counters: dict[str, Any]) -> tuple[int, int]:
    """How far a replica's counter snapshot is: every one of its totals only grows."""
    return int(counters.get("calls", 0)), int(counters.get("steps", 0))
