"""Per-endpoint request analytics over a time window, from the server's durable job records.

Latency is submission to completion and queue wait submission to start (what `/metrics` observes, read back from
the job store so a restarted server still shows its history, within retention). Requests refused before they became
jobs (a 422, a 401) are not jobs: `/metrics` counts them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..runtime.jobstore import JobTiming

PERCENTILES = (50, 75, 90, 99)
MIN_WINDOW_S, MAX_WINDOW_S = 60.0, 30 * 86400.0
RECENT_FAILURES = 10
BUCKETS = 30


@dataclass(frozen=True)
class Window:
    """[start, end) in wall-clock seconds, split into `BUCKETS` equal buckets for the charts."""

    start: float
    end: float

    @classmethod
    def last(cls, seconds: float, now: float | None = None) -> "Window":
        now = time.time() if now is None else now
        return cls(now - min(max(float(seconds), MIN_WINDOW_S), MAX_WINDOW_S), now)

    @property
    def bucket_s(self) -> float:
        return (self.end - self.start) / BUCKETS

    def bucket(self, t: float) -> int:
        return min(BUCKETS - 1, max(0, int((t - self.start) // self.bucket_s)))


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50..p99 (linear interpolation, numpy's default); None for each when there are no values."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(data, PERCENTILES))}


def _latency(job: JobTiming) -> float | None:
    return max(0.0, job.finished_at - job.created_at) if job.finished_at is not None else None


def _wait(job: JobTiming) -> float | None:
    return max(0.0, job.started_at - job.created_at) if job.started_at is not None else None


def summarize_endpoint(jobs: list[JobTiming], window: Window) -> dict[str, Any]:
    """One endpoint's figures: counts, success rate, latency and queue-wait percentiles, errors by type, recent
    failures and per-bucket series (requests, failures, p50/p90 latency) for the charts."""
    finished = [j for j in jobs if j.state == "COMPLETED"]
    failed = [j for j in finished if j.error_type is not None]
    latencies = [v for v in map(_latency, finished) if v is not None]
    waits = [v for v in map(_wait, jobs) if v is not None]
    per_bucket: list[list[float]] = [[] for _ in range(BUCKETS)]
    requests, failures = [0] * BUCKETS, [0] * BUCKETS
    for job in jobs:
        requests[window.bucket(job.created_at)] += 1
    for job in finished:
        b = window.bucket(job.created_at)
        failures[b] += job.error_type is not None
        latency = _latency(job)
        if latency is not None:
            per_bucket[b].append(latency)
    p50 = [float(np.percentile(v, 50)) if v else None for v in per_bucket]
    p90 = [float(np.percentile(v, 90)) if v else None for v in per_bucket]
    return {
        "requests": len(jobs),
        "completed": len(finished),
        "succeeded": len(finished) - len(failed),
        "failed": len(failed),
        "in_flight": len(jobs) - len(finished),
        "success_rate": (len(finished) - len(failed)) / len(finished) if finished else None,
        "latency_s": percentiles(latencies),
        "queue_wait_s": percentiles(waits),
        "errors_by_type": dict(Counter(j.error_type for j in failed).most_common()),
        "recent_failures": [{"request_id": j.id, "submitted_at": j.created_at, "error_type": j.error_type,
                             "error": (j.error or "")[:500]} for j in reversed(failed[-RECENT_FAILURES:])],
        "series": {"t": [window.start + (i + 0.5) * window.bucket_s for i in range(BUCKETS)],
                   "requests": requests, "failures": failures, "latency_p50_s": p50, "latency_p90_s": p90},
    }


def build_analytics(jobs: list[JobTiming], window: Window, app_ids: Iterable[str]) -> dict[str, Any]:
    """Every served endpoint (those with no job in the window too) plus any other app id found in the records."""
    by_app: dict[str, list[JobTiming]] = {app: [] for app in app_ids}
    for job in jobs:
        if window.start <= job.created_at < window.end + 1.0:
            by_app.setdefault(job.app_id, []).append(job)
    return {"window": {"start": window.start, "end": window.end, "seconds": window.end - window.start,
                       "bucket_s": window.bucket_s},
            "percentiles": [f"p{p}" for p in PERCENTILES],
            "endpoints": {app: summarize_endpoint(items, window) for app, items in sorted(by_app.items())}}
