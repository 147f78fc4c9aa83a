"""The server's Prometheus metrics through `prometheus_client`, one `CollectorRegistry` per app (two apps in one
process never share or collide): requests and failures per app, completed jobs, a latency histogram per app
(submission to completion), and the queue depth and running jobs read at scrape time. When the engine reports
per-replica counters (an optional `replica_stats()` hook: the scale-out proxy has one), they are exported labelled by
replica, read at scrape time by a custom collector (the server never imports the scale-out code)."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
ReplicaStats = Callable[[], Mapping[str, Mapping[str, float]]]  # replica -> counter name -> value

# counter name in `replica_stats()` -> (metric, help, extra labels)
REPLICA_COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "jobs_done": ("engine_replica_jobs", "Jobs each replica ran, by outcome (as the ingress saw them).",
                  {"outcome": "done"}),
    "jobs_failed": ("engine_replica_jobs", "", {"outcome": "failed"}),
    "jobs_cancelled": ("engine_replica_jobs", "", {"outcome": "cancelled"}),
    "model_calls": ("engine_replica_model_calls", "Model calls each replica made (a batch is one).", {}),
    "steps": ("engine_replica_denoise_steps", "Denoising steps each replica ran, per request.", {}),
    "batches": ("engine_replica_batches", "Batches each replica ran (with request batching).", {}),
}


class Metrics:
    """`depth()` answers (queued, running) when scraped."""

    def __init__(self, depth: Callable[[], tuple[int, int]] | None = None,
                 replicas: ReplicaStats | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if replicas is not None:
            self.registry.register(_ReplicaCollector(replicas))
        self._requests = Counter("engine_requests", "Requests received, by app and kind (run, submit, stream).",
                                 ["app", "kind"], registry=self.registry)
        self._failures = Counter("engine_failures", "Requests refused or failed, by app and error type.",
                                 ["app", "error_type"], registry=self.registry)
        self._completed = Counter("engine_jobs_completed", "Jobs that reached COMPLETED (with or without an error).",
                                  ["app"], registry=self.registry)
        self._latency = Histogram("engine_request_latency_seconds", "Submission to completion, per app.", ["app"],
                                  buckets=BUCKETS, registry=self.registry)
        depth = depth or (lambda: (0, 0))
        Gauge("engine_queue_depth", "Jobs waiting to start.",
              registry=self.registry).set_function(lambda: depth()[0])
        Gauge("engine_jobs_running", "Jobs running now.", registry=self.registry).set_function(lambda: depth()[1])

    def request(self, app: str, kind: str) -> None:
        self._requests.labels(app=app, kind=kind).inc()

    def failure(self, app: str, error_type: str) -> None:
        self._failures.labels(app=app, error_type=error_type).inc()

    def done(self, app: str, seconds: float, error_type: str | None) -> None:
        self._completed.labels(app=app).inc()
        if error_type is not None:
            self.failure(app, error_type)
        self._latency.labels(app=app).observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The text exposition format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    """`replica_stats()` as counter families, one sample per replica (and outcome)."""

    def __init__(self, stats: ReplicaStats):
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only (the replicas are not known at registration)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        stats = self._stats()
        for key, (name, doc, extra) in REPLICA_COUNTERS.items():
            if name not in families:
                families[name] = CounterMetricFamily(name, doc, labels=["replica", *extra])
            for replica, row in sorted(stats.items()):
                if key in row:
                    families[name].add_metric([replica, *extra.values()], row[key])
        yield from families.values()
