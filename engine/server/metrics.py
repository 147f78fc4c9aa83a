"""Prometheus text exposition of the server's counters, written by hand (a dozen lines do not need a dependency):
requests and failures per app, queue depth, and a latency histogram per app (submission to completion)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (app, kind)
        self.failures: dict[tuple[str, str], int] = defaultdict(int)  # (app, error_type)
        self.completed: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def request(self, app: str, kind: str) -> None:
        with self._lock:
            self.requests[(app, kind)] += 1

    def failure(self, app: str, error_type: str) -> None:
        with self._lock:
            self.failures[(app, error_type)] += 1

    def done(self, app: str, seconds: float, error_type: str | None) -> None:
        with self._lock:
            self.completed[app] += 1
            if error_type is not None:
                self.failures[(app, error_type)] += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.latency_buckets[app][i] += 1
            self.latency_sum[app] += seconds
            self.latency_count[app] += 1

    def render(self, queued: int, running: int) -> str:
        lines = [
            "# HELP engine_requests_total Requests received, by app and kind (run, submit, stream).",
            "# TYPE engine_requests_total counter",
        ]
        with self._lock:
            for (app, kind), n in sorted(self.requests.items()):
                lines.append(f'engine_requests_total{{app="{_label(app)}",kind="{kind}"}} {n}')
            lines += ["# HELP engine_failures_total Requests refused or failed, by app and error type.",
                      "# TYPE engine_failures_total counter"]
            for (app, kind), n in sorted(self.failures.items()):
                lines.append(f'engine_failures_total{{app="{_label(app)}",error_type="{_label(kind)}"}} {n}')
            lines += ["# HELP engine_jobs_completed_total Jobs that reached COMPLETED (with or without an error).",
                      "# TYPE engine_jobs_completed_total counter"]
            for app, n in sorted(self.completed.items()):
                lines.append(f'engine_jobs_completed_total{{app="{_label(app)}"}} {n}')
            lines += ["# HELP engine_request_latency_seconds Submission to completion, per app.",
                      "# TYPE engine_request_latency_seconds histogram"]
            for app in sorted(self.latency_count):
                name = _label(app)
                for bound, n in zip(BUCKETS, self.latency_buckets[app], strict=True):
                    lines.append(f'engine_request_latency_seconds_bucket{{app="{name}",le="{bound}"}} {n}')
                count = self.latency_count[app]
                lines.append(f'engine_request_latency_seconds_bucket{{app="{name}",le="+Inf"}} {count}')
                lines.append(f'engine_request_latency_seconds_sum{{app="{name}"}} {self.latency_sum[app]:.6f}')
                lines.append(f'engine_request_latency_seconds_count{{app="{name}"}} {self.latency_count[app]}')
        lines += ["# HELP engine_queue_depth Jobs waiting to start.", "# TYPE engine_queue_depth gauge",
                  f"engine_queue_depth {queued}",
                  "# HELP engine_jobs_running Jobs running now.", "# TYPE engine_jobs_running gauge",
                  f"engine_jobs_running {running}"]
        return "\n".join(lines) + "\n"
