"""Request batching inside one replica: requests with the same `BatchKey` that arrive within `max_wait_s` of the
first run as one batch of at most `max_batch_size`; the batch's results are split back per request. Requests with
different keys never share a batch (Ray Serve's `@serve.batch` has no key, so this keeps one pending list per key).

`run(items) -> results` is called once per batch in a worker thread (the model call blocks); it must return one
result or exception per item, in order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 8
    max_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")


@dataclass
class _Pending:
    items: list[Any] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class KeyedBatcher:
    """`await batcher.submit(key, item)` -> that item's result, run in a batch with same-key items."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], config: BatchConfig = BatchConfig()):
        self._run = run
        self.config = config
        self._pending: dict[Hashable, _Pending] = {}
        self._lock = asyncio.Lock()  # one batch on the model at a time (a device does one call well)
        self.batches: list[int] = []  # sizes of the batches run, in order (counters for tests and /stats)

    async def submit(self, key: Hashable, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        pending = self._pending.setdefault(key, _Pending())
        pending.items.append(item)
        pending.futures.append(future)
        if len(pending.items) >= self.config.max_batch_size:
            self._flush(key)
        elif pending.timer is None:
            pending.timer = loop.call_later(self.config.max_wait_s, self._flush, key)
        return await future

    def _flush(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        asyncio.get_running_loop().create_task(self._execute(pending))

    async def _execute(self, pending: _Pending) -> None:
        async with self._lock:
            self.batches.append(len(pending.items))
            try:
                results = await asyncio.to_thread(self._run, list(pending.items))
                if len(results) != len(pending.items):
                    raise RuntimeError(f"batch of {len(pending.items)} returned {len(results)} results")
            except BaseException as e:  # noqa: BLE001 - the whole batch failed: every caller gets the error
                results = [e] * len(pending.items)
        for future, result in zip(pending.futures, results):
            if future.done():  # the caller went away (cancelled)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
