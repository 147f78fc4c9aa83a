"""The durable side of the job queue: one SQLite file (WAL) under the state dir holding every job's record.

A record is JSON: how to run the job again (`record`: the request's arguments), its state, its result (file
references, not bytes, where the result points at stored files), its error (`error_type`, status, body), its logs and
timestamps (wall clock). The queue writes a record when a job is submitted, starts and finishes; after a restart it
reads them back: completed jobs are served until retention, queued ones run again, running ones failed as
`interrupted`.

One process owns a state dir at a time (an OS file lock, freed if the process dies).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from filelock import FileLock, Timeout

from ..errors import StateDirLockedError  # noqa: F401 - re-exported (raised here)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    app_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    inference_time REAL,
    record TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    logs TEXT NOT NULL DEFAULT '[]',
    files TEXT NOT NULL DEFAULT '[]',
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""
# columns added after the first release: (name, declaration), added to an older file when it is opened
_ADDED_COLUMNS = (("started_at", "REAL"),)


def default_state_dir() -> Path | None:
    """`$ENGINE_CACHE_DIR/state` when ENGINE_CACHE_DIR is set, else None (a temporary dir, gone on close)."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    return Path(env).expanduser() / "state" if env else None


@dataclass
class StoredJob:
    """One job as read back from the store."""

    id: str
    app_id: str
    state: str
    created_at: float
    finished_at: float | None = None
    inference_time: float | None = None
    record: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: dict[str, Any] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0


@dataclass(frozen=True)
class JobTiming:
    """When one job was submitted, started and finished (wall clock), and how it ended."""

    id: str
    app_id: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error_type: str | None
    error: str | None


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class JobStore:
    """Thread-safe SQLite job table. `root` None: a temporary state dir, removed on `close()`."""

    def __init__(self, root: str | Path | None = None):
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="engine-state-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.root / "state.lock"))
        try:
            self._file_lock.acquire(timeout=0)
        except Timeout:
            raise StateDirLockedError(f"state dir {self.root} is in use by another process") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.root / "jobs.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at)")
        self._seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0])
        self.closed = False

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    # -- writing --------------------------------------------------------------------------------------------------
    def _execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            if self.closed:
                return []
            return self._db.execute(sql, tuple(params)).fetchall()

    def add(self, job_id: str, app_id: str, *, record: dict[str, Any] | None, meta: dict[str, Any],
            created_at: float | None = None) -> None:
        """A queued job (re-adding an id keeps its place: a resumed job)."""
        with self._lock:
            if self.closed:
                return
            self._seq += 1
            self._db.execute(
                "INSERT INTO jobs (id, seq, app_id, state, created_at, record, meta) "
                "VALUES (?, ?, ?, 'IN_QUEUE', ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state='IN_QUEUE', record=excluded.record, meta=excluded.meta",
                (job_id, self._seq, app_id, created_at or time.time(), _dumps(record), _dumps(meta) or "{}"))

    def started(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET state='IN_PROGRESS', started_at=? WHERE id=?", (time.time(), job_id))

    def finished(self, job_id: str, *, result: Any, error: dict[str, Any] | None, logs: list[dict[str, Any]],
                 files: list[dict[str, Any]], inference_time: float | None, result_json: str | None,
                 nbytes: int) -> None:
        self._execute(
            "UPDATE jobs SET state='COMPLETED', finished_at=?, inference_time=?, result=?, error=?, logs=?, files=?, "
            "bytes=?, record=NULL WHERE id=?",
            (time.time(), inference_time, result_json, _dumps(error), _dumps(logs) or "[]", _dumps(files) or "[]",
             nbytes, job_id))

    def delete(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            self._execute(f"DELETE FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    # -- reading --------------------------------------------------------------------------------------------------
    _COLUMNS = ("id, app_id, state, created_at, finished_at, inference_time, record, meta, result, error, logs, files, "
                "bytes")

    def _row(self, row: tuple) -> StoredJob:
        (job_id, app_id, state, created, finished, inference, record, meta, result, error, logs, files, nbytes) = row
        return StoredJob(job_id, app_id, state, created, finished, inference,
                         json.loads(record) if record else None, json.loads(meta or "{}"),
                         json.loads(result) if result else None, json.loads(error) if error else None,
                         json.loads(logs or "[]"), json.loads(files or "[]"), nbytes or 0)

    def get(self, job_id: str) -> StoredJob | None:
        rows = self._execute(f"SELECT {self._COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return self._row(rows[0]) if rows else None

    def in_state(self, state: str) -> list[StoredJob]:
        rows = self._execute(f"SELECT {self._COLUMNS} FROM jobs WHERE state=? ORDER BY seq", (state,))
        return [self._row(r) for r in rows]

    def completed_index(self) -> list[tuple[str, float, int, list[dict[str, Any]]]]:
        """(id, finished_at, bytes, files) of every completed job, oldest first."""
        rows = self._execute("SELECT id, finished_at, bytes, files FROM jobs WHERE state='COMPLETED' "
                             "ORDER BY finished_at, seq")
        return [(r[0], r[1] or 0.0, r[2] or 0, json.loads(r[3] or "[]")) for r in rows]

    def timings_since(self, since: float) -> list[JobTiming]:
        """Every job submitted at or after `since` (wall clock), oldest first: what the analytics page aggregates."""
        rows = self._execute(
            "SELECT id, app_id, state, created_at, started_at, finished_at, error FROM jobs WHERE created_at >= ? "
            "ORDER BY created_at, seq", (since,))
        out = []
        for job_id, app_id, state, created, started, finished, error in rows:
            err = json.loads(error) if error else None
            out.append(JobTiming(job_id, app_id, state, created, started, finished,
                                 (err or {}).get("error_type") if err else None,
                                 (err or {}).get("message") if err else None))
        return out

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._db.close()
            finally:
                self._file_lock.release()
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def open_store(state_dir: str | Path | None, *, explicit: bool) -> JobStore:
    """The store for `state_dir` (None: temporary). A dir another process holds is an error when the caller named
    it (`explicit`); a default one falls back to a temporary store, with a warning."""
    try:
        return JobStore(state_dir)
    except StateDirLockedError:
        if explicit or state_dir is None:
            raise
        log.warning("state dir %s is in use by another process; this server keeps its jobs in a temporary dir",
                    state_dir)
        return JobStore(None)
