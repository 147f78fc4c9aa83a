"""prompt cache pass: an LRU of prompt -> text-encoder outputs, so repeated prompts skip the text encoders."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

from .context import PassContext


class PromptCache:
    """Thread-safe LRU; values are the pipeline's conditioning dicts, which the pipelines never modify in place."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def apply_prompt_cache(ctx: PassContext) -> None:
    size = ctx.config.prompt_cache_size
    if size <= 0:
        ctx.report.skipped("prompt_cache", "disabled in config (prompt_cache_size 0)")
        return
    ctx.state["prompt_cache"] = PromptCache(size)
    ctx.report.applied("prompt_cache", f"LRU of {size} prompts")
