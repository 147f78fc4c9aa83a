"""Progress for people at a terminal: tqdm bars for denoising steps, upscaling tiles and loading.

Bars go to stderr and only when it is an interactive terminal (`interactive()`), so pipes, logs and `--json`
scripts see none of them. The library code reports progress through plain callbacks; this module turns them into bars:

- `StepBar` is a pipeline `step_callback(i, n, latents)`;
- `TileBar` is a tile callback `(done, total)`; the AuraSR pipeline reports to the callback it is given or, when none
  is, to the one installed by `reporting_tiles(...)` for the current context (so a caller above `Engine.upscale`, such
  as the CLI, can listen without threading a callback through every layer);
- `activity(...)` is an elapsed-time line for work with no count (loading a model).

tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from typing import IO, Any, Callable, Iterator

# (tiles done, tiles in all) after each batch of tiles.
TileCallback = Callable[[int, int], None]

_tile_listener: contextvars.ContextVar[TileCallback | None] = contextvars.ContextVar("engine_tile_listener",
                                                                                     default=None)


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether `stream` (default: stderr) is a terminal a person watches."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


@contextlib.contextmanager
def reporting_tiles(callback: TileCallback | None) -> Iterator[None]:
    """Within the block, pipelines that tile report `(done, total)` to `callback` unless given their own."""
    token = _tile_listener.set(callback)
    try:
        yield
    finally:
        _tile_listener.reset(token)


def tile_listener() -> TileCallback | None:
    """The tile callback installed by `reporting_tiles` for the current context, if any."""
    return _tile_listener.get()


class _Bar:
    """A tqdm bar opened on first use (so its total is known) and closed when the count reaches it.
    With `enabled=False` it only counts: `count` and `total` still follow the calls."""

    unit = "it"

    def __init__(self, desc: str, *, enabled: bool, file: IO[str] | None = None):
        self.desc = desc
        self.enabled = enabled
        self.file = file
        self.count = 0
        self.total = 0
        self._bar: Any = None

    def _advance(self, done: int, total: int) -> None:
        if done < self.count or total != self.total:  # a new run (a retry after a fallback, the next pass)
            self.close()
            self.count = 0
        self.total = total
        if self.enabled and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False, dynamic_ncols=True,
                             file=self.file if self.file is not None else sys.stderr)
        if self._bar is not None:
            self._bar.update(done - self.count)
        self.count = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepBar(_Bar):
    """A pipeline step callback that shows a bar of denoising steps."""

    unit = "step"

    def __init__(self, desc: str = "denoise", *, enabled: bool, file: IO[str] | None = None):
        super().__init__(desc, enabled=enabled, file=file)

    def __call__(self, i: int, n: int, latents: Any = None) -> None:
        self._advance(i + 1, n)


class TileBar(_Bar):
    """A tile callback that shows a bar of upscaled tiles."""

    unit = "tile"

    def __init__(self, desc: str = "tiles", *, enabled: bool, file: IO[str] | None = None):
        super().__init__(desc, enabled=enabled, file=file)

    def __call__(self, done: int, total: int) -> None:
        self._advance(done, total)


@contextlib.contextmanager
def activity(desc: str, *, enabled: bool, file: IO[str] | None = None, interval: float = 0.5) -> Iterator[None]:
    """An elapsed-time line (`loading sdxl: 12s`) while the block runs, for work that reports no count. The line is
    cleared when the block ends; nothing is shown when not `enabled`."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False,
               file=file if file is not None else sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            bar.refresh()

    thread = threading.Thread(target=tick, name="engine-activity", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
