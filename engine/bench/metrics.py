"""Measurements: synchronised timers, stage boundaries from module hooks, peak memory, FLOPs, the device's peak.

Why hooks for stages: the stock diffusers pipeline has no stage timers, but every pipeline calls its denoiser and then
its VAE decoder, so forward pre-hooks on those two modules mark the encode|denoise and denoise|decode boundaries for
any pipeline, stock or ours, without touching its code. The same boundaries split the FLOP count per stage. For an
upscaler the boundaries are the first tile batch's start and the last one's end (preprocess | tiles | stitch).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils import flop_counter



def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run `fn` once; seconds from a synchronised start to a synchronised end, and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank, so with few runs it is an observed value, not an interpolation), min, max and the
    spread ((max - min) / median): on a shared machine the spread says how far to trust the median."""
    ordered = sorted(times)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    median = statistics.median(ordered)
    return {"median_s": median, "p90_s": p90, "min_s": ordered[0], "max_s": ordered[-1],
            "spread": (ordered[-1] - ordered[0]) / median if median else 0.0, "runs": len(ordered)}


# -- stage boundaries ---------------------------------------------------------------------------------------------

class BoundaryProbe:
    """Marks (time, FLOPs so far) where the second and the third of a task's three stages begin, from module hooks
    placed by a subclass; `counter`, when set, is read for the FLOPs. `split` turns the marks of one call into
    per-stage times and FLOPs (a boundary never reached puts the rest of the call in the stage before it)."""

    stages: tuple[str, str, str]

    def __init__(self, device: torch.device):
        self.device = device
        self.counter: flop_counter.FlopCounterMode | None = None
        self.marks: dict[str, tuple[float, int]] = {}
        self._handles: list[Any] = []

    def _record(self, boundary: str) -> None:
        sync(self.device)
        self.marks[boundary] = (time.perf_counter(), self.counter.get_total_flops() if self.counter else 0)

    def reset(self) -> None:
        self.marks = {}

    def split(self, start: float, end: float, total_flops: int = 0) -> tuple[dict[str, float], dict[str, int]]:
        """Stage times and FLOPs of the call that ran between `start` and `end` (absolute perf_counter values)."""
        first, second, third = self.stages
        t2, f2 = self.marks.get(second, (end, total_flops))
        t3, f3 = self.marks.get(third, (end, total_flops))
        times = {first: t2 - start, second: t3 - t2, third: end - t3, "total": end - start}
        return times, {first: f2, second: f3 - f2, third: total_flops - f3}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StageProbe(BoundaryProbe):
    """Text-to-image: forward pre-hooks on the denoiser and the VAE decoder; the first call of each is where encode
    ends and where decode starts."""

    stages = ("encode", "denoise", "decode")

    def __init__(self, denoiser: torch.nn.Module, vae: torch.nn.Module, device: torch.device):
        super().__init__(device)
        decode_entry = [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None))
                        if isinstance(m, torch.nn.Module)]
        self._handles = [denoiser.register_forward_pre_hook(self._hook("denoise"))]
        self._handles += [m.register_forward_pre_hook(self._hook("decode")) for m in decode_entry]

    def _hook(self, stage: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if stage in self.marks or (stage == "decode" and "denoise" not in self.marks):
                return
            self._record(stage)
        return hook


class TileProbe(BoundaryProbe):
    """Tiled upscalers: a forward pre-hook marks the first tile batch's start, a forward hook each batch's end; the
    last end is where stitching begins."""

    stages = ("preprocess", "tiles", "stitch")

    def __init__(self, network: torch.nn.Module, device: torch.device):
        super().__init__(device)
        self._handles = [network.register_forward_pre_hook(self._first_tiles),
                         network.register_forward_hook(lambda *_: self._record("stitch"))]

    def _first_tiles(self, module: torch.nn.Module, args: Any) -> None:
        if "tiles" not in self.marks:
            self._record("tiles")


# -- FLOPs ----------------------------------------------------------------------------------------------------------

def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flop_mapping() -> dict[Any, Any]:
    """Ops the counter's table lacks. On the CPU, SDPA runs as `_scaled_dot_product_flash_attention_for_cpu`, which
    torch's table does not list, so attention would count as zero; it has the same FLOPs as the other SDPA kernels."""
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        mapping[op] = _sdpa_cpu_flop
    return mapping


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())


@dataclass
class FlopCount:
    """FLOPs of one call: total, per stage, and per top-level module and op (for checks against hand counts)."""

    total: int
    stages: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "stages": self.stages, "by_module": self.by_module}


def count_flops(fn: Callable[[], Any], probe: BoundaryProbe | None = None) -> tuple[FlopCount, Any]:
    """Run `fn` eagerly under FlopCounterMode (compiled graphs bypass the counter, so count on an eager run)."""
    counter = flop_counter_mode()
    if probe is not None:
        probe.reset()
        probe.counter = counter
    try:
        start = time.perf_counter()
        with counter:
            out = fn()
        end = time.perf_counter()
    finally:
        if probe is not None:
            probe.counter = None
    total = counter.get_total_flops()
    stages = probe.split(start, end, total)[1] if probe is not None else {}
    by_module = {name: {str(op).replace("aten.", ""): int(v) for op, v in ops.items()}
                 for name, ops in counter.get_flop_counts().items() if "." not in name}
    return FlopCount(total=int(total), stages=stages, by_module=by_module), out


# -- memory ---------------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory over a block: CUDA max allocated on GPUs; on the CPU the process RSS, sampled by a thread (the
    kernel keeps no resettable peak), so very short spikes between samples can be missed."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_sampled"

    @contextlib.contextmanager
    def measure(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            try:
                yield self
            finally:
                self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        import psutil

        proc = psutil.Process()
        self.start_bytes = self.peak_bytes = proc.memory_info().rss
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
                stop.wait(self.interval_s)

        thread = threading.Thread(target=sample, name="bench-rss", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "peak_bytes": self.peak_bytes,
                "peak_above_start_bytes": max(0, self.peak_bytes - self.start_bytes)}


# -- the device's peak ----------------------------------------------------------------------------------------------

def measure_peak_flops(device: torch.device, dtype: torch.dtype, *, size: int | None = None,
                       budget_s: float = 3.0) -> dict[str, Any]:
    """FLOP/s of a large square matmul in `dtype`: the best of many runs within `budget_s`. This is the practical
    ceiling the utilisation is measured against (on GPUs it sits somewhat below the datasheet's dense peak). The
    best, not the median, because on a shared machine the median measures the neighbours; both are recorded."""
    n = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator("cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    flops = 2 * n**3
    with torch.inference_mode():
        timed(lambda: a @ b, device)  # warm-up: library init, kernel selection
        times: list[float] = []
        while len(times) < 3 or (sum(times) < budget_s and len(times) < 200):
            times.append(timed(lambda: a @ b, device)[0])
    return {"dtype": str(dtype).replace("torch.", ""), "size": n, "flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times), "runs": len(times),
            "threads": torch.get_num_threads()}
