"""Scenarios -> runs. Per scenario, in one process on the same weights: the stock pipeline in fp32 as the baseline
(diffusers; for upscaling the reference aura-sr package), the stock pipeline in bf16 (where the device has native
bf16; otherwise a skipped row saying why), then each engine preset; warm-up runs, then N timed runs; FLOPs counted on
an eager run of each distinct job; quality against the baseline's images of the same seed; speed-ups against both
stock rows, all taken in this one run.

Every preset runs inside its own try: anything that goes wrong (a backend that is not installed, a pass that does
not compile, an out-of-memory) becomes a skipped row with its reason and the run goes on, because one broken preset
must not cost the figures of all the others.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any, Callable

import torch
from PIL import Image

from .metrics import FlopCount, PeakMemory, measure_peak_flops, timed
from .presets import (DTYPE_NAMES, EngineCounter, Prepared, PresetSkipped, Row, Settings, prepare_engine,
                      stock_runner, timed_rounds, warm_up)
from .quality import psnr, ssim
from .scenario import Job, Preset, Scenario


# -- one scenario ---------------------------------------------------------------------------------------------------

def _skip(row: Row, exc: BaseException) -> None:
    row.status = "skipped"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    row.reason = message if isinstance(exc, PresetSkipped) else f"{type(exc).__name__}: {message}"[:400]
    if not isinstance(exc, PresetSkipped):
        row.error = "".join(traceback.format_exception(exc)[-6:])[-3000:]
    row.images = []


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ScenarioRun:
    """Runs one resolved scenario; `result()` gives its JSON-ready figures (images kept aside in `rows`)."""

    def __init__(self, scenario: Scenario, settings: Settings, peaks: dict[str, dict[str, Any]],
                 on_start: Callable[[str], None] | None = None, on_done: Callable[[Row], None] | None = None):
        self.sc = scenario
        self.settings = settings
        self.peaks = peaks  # dtype name -> measure_peak_flops(), shared across scenarios
        self.on_start = on_start or (lambda name: None)
        self.on_done = on_done or (lambda row: None)
        self.rows: list[Row] = []
        self.flops: dict[tuple[Any, ...], FlopCount] = {}
        self.reference_images: dict[tuple[Any, ...], list[Image.Image]] = {}
        self.quality_reference: str | None = None
        self.notes: list[str] = []
        self._baseline: tuple[Any, Job, Row] | None = None  # the stock fp32 runner, kept for the FLOP counts

    def _jobs(self) -> dict[tuple[Any, ...], Job]:
        return {self.sc.job_for(p).key(): self.sc.job_for(p) for p in self.sc.presets}

    def run(self) -> None:
        """Load and warm up every preset (keeping each loaded), then the timed runs round-robin, then free them."""
        prepared: list[Prepared] = []
        try:
            for preset in self.sc.presets:
                self.on_start(preset.name)
                job = self.sc.job_for(preset)
                row = Row(preset=preset.name, kind="stock" if preset.stock else "engine",
                          description=preset.description, job=asdict(job), dtype=preset.dtype if preset.stock else None)
                self.rows.append(row)
                try:
                    prepared.append(self._prepare_stock(preset, job, row) if preset.stock
                                    else prepare_engine(preset, job, self.settings, row))
                except Exception as e:  # noqa: BLE001 - any failure of one preset is that preset's row
                    _skip(row, e)
                    _free(self.settings.device)
                    self.on_done(row)
            timed_rounds(prepared, self.settings, self._failed)
            for p in prepared:
                if p.row.status == "ok":
                    self.on_done(p.row)
            self._count_stock(prepared)
        finally:
            for p in prepared:
                p.close()
            self._baseline = None
            _free(self.settings.device)
        self._count_missing()
        self._derive()

    def _failed(self, prepared: Prepared, exc: BaseException) -> None:
        _skip(prepared.row, exc)
        self.on_done(prepared.row)

    def _prepare_stock(self, preset: Preset, job: Job, row: Row) -> Prepared:
        missing = preset.missing_requirement(self.settings.device)
        if missing:
            raise PresetSkipped(missing)
        dtype = {v: k for k, v in DTYPE_NAMES.items()}[preset.dtype]
        memory = PeakMemory(self.settings.device)
        runner: Any = None
        try:
            with memory.measure():
                row.load_s, runner = timed(lambda: stock_runner(job, self.settings.device, dtype),
                                           self.settings.device)
                row.dtype = DTYPE_NAMES.get(runner.dtype)
                call = runner.call(job)
                warm_up(call, self.settings, row)
            row.memory = memory.as_dict()
        except BaseException:
            if runner is not None:
                runner.close()
            raise
        if preset.baseline:
            self._baseline = (runner, job, row)
        return Prepared(row, call, runner.close, job.stages)

    def _count_stock(self, prepared: list[Prepared]) -> None:
        """The baseline's images are the quality reference; every job of the scenario is FLOP-counted on it (eager,
        no caches)."""
        if self._baseline is None or self._baseline[2].status != "ok":
            return
        runner, job, row = self._baseline
        self.reference_images[job.key()] = row.images
        self.quality_reference = row.preset
        if not self.settings.count_flops:
            return
        for key, other in self._jobs().items():
            try:
                self.flops[key], images = runner.count(other)
            except Exception as e:  # noqa: BLE001 - a preset's job the pipeline refuses: that preset fails
                self.notes.append(f"FLOP count of {_job_label(other)} failed: {type(e).__name__}: {e}")
                continue
            self.reference_images.setdefault(key, images)

    def _count_missing(self) -> None:
        """Jobs not counted on a stock pipeline (none in the scenario, or it failed): count them on an O0 engine,
        whose numerics are stock's; its images then serve as the quality reference."""
        ran = {Job(**r.job).key(): Job(**r.job) for r in self.rows if r.status == "ok"}
        missing = {k: j for k, j in ran.items() if k not in self.flops}
        if not missing or not self.settings.count_flops:
            return
        counter: EngineCounter | None = None
        try:
            counter = EngineCounter(self.sc.job.model, self.settings.device, self.sc.job.task)
            for key, job in missing.items():
                self.flops[key], images = counter.count(job)
                if key not in self.reference_images:
                    self.reference_images[key] = images
                    self.quality_reference = self.quality_reference or "engine O0 (stock numerics)"
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"FLOP count failed: {type(e).__name__}: {e}")
        finally:
            if counter is not None:
                counter.close()
            _free(self.settings.device)

    def _peak(self, dtype: str) -> float | None:
        if dtype not in self.peaks:
            torch_dtype = {v: k for k, v in DTYPE_NAMES.items()}[dtype]
            try:
                self.peaks[dtype] = measure_peak_flops(self.settings.device, torch_dtype)
            except Exception as e:  # noqa: BLE001 - e.g. a dtype the device has no matmul for
                self.peaks[dtype] = {"dtype": dtype, "flops_per_s": None, "error": str(e)}
        return self.peaks[dtype]["flops_per_s"]

    def _derive(self) -> None:
        ok = [r for r in self.rows if r.status == "ok"]
        stock = {r.dtype: r for r in ok if r.kind == "stock"}
        base = stock.get("fp32")
        for row in ok:
            try:
                self._derive_row(row, base, stock.get("bf16"))
            except Exception as e:  # noqa: BLE001 - a figure that can't be derived is missing, the rest stays
                row.notes.append(f"derived figures incomplete: {type(e).__name__}: {e}")

    def _derive_row(self, row: Row, base: Row | None, base_bf16: Row | None) -> None:
        """Speed-ups (against stock fp32 and stock bf16), FLOPs, FLOP/s, utilisation and quality of one preset."""
        base_key = self.sc.job.key()
        job = Job(**row.job)
        row.job_differs = job.key() != base_key
        median = row.timing["median_s"]
        if base is not None:
            row.speedup = base.timing["median_s"] / median
        if base_bf16 is not None:
            row.speedup_bf16 = base_bf16.timing["median_s"] / median
        count = self.flops.get(job.key())
        if count is not None:
            row.flops_per_image = count.total / job.num_images
            row.flops_stages = count.stages
            row.achieved_flops_per_s = count.total / median
            peak = self._peak(row.dtype) if row.dtype else None
            row.peak_flops_per_s = peak
            row.utilisation = row.achieved_flops_per_s / peak if peak else None
        ref = self.reference_images.get(base_key)
        if ref is not None and row.images:
            p = psnr(ref, row.images)
            row.identical = p == float("inf")
            row.psnr_db = None if row.identical else p
            row.ssim = ssim(ref, row.images)
        same = self.reference_images.get(job.key())
        if same is not None and row.images and row.job_differs:
            p = psnr(same, row.images)
            row.psnr_same_job_db = None if p == float("inf") else p
            row.ssim_same_job = ssim(same, row.images)
        if row.stages_s.get("encode", 1.0) < 1e-3 and row.kind == "engine":
            row.notes.append("encode ~0: prompt cache hit (same prompt every run)")

    def result(self, count_reference: bool) -> dict[str, Any]:
        from .reference import project

        rows = [r.as_dict() for r in self.rows]
        peaks = {d: p["flops_per_s"] for d, p in self.peaks.items() if p.get("flops_per_s")}
        reference = []
        for job_id in self.sc.reference_jobs:
            try:
                reference.append(project(job_id, peaks, [r for r in rows if r["status"] == "ok"],
                                         count=count_reference))
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"reference {job_id}: {type(e).__name__}: {e}")
        return {"name": self.sc.name, "description": self.sc.description, "scale": self.sc.scale,
                "source": self.sc.source, "job": asdict(self.sc.job), "quality_reference": self.quality_reference,
                "rows": rows, "flops": {_job_label(Job(*k)): c.as_dict() for k, c in self.flops.items()},
                "reference": reference, "notes": self.notes}


def _job_label(job: Job) -> str:
    if job.task == "upscale":
        mode = ", ".join(n for n, on in (("overlapping tiles", job.overlapping_tiles),
                                          ("shared style", job.shared_style)) if on)
        return f"{job.model} {job.width}x{job.height} -> 4x" + (f", {mode}" if mode else "")
    sched = f", {job.scheduler}" if job.scheduler else ""
    mode = "" if job.mode == "text2img" else f", {job.mode}"
    mode += f" strength {job.strength}" if job.strength is not None else ""
    mode += f" {job.controlnet} x{job.conditioning_scale}" if job.controlnet else ""
    return f"{job.model} {job.width}x{job.height}, {job.steps} steps, guidance {job.guidance_scale}{sched}{mode}"


# -- the whole run --------------------------------------------------------------------------------------------------

def run_benchmark(scenarios: list[Scenario], settings: Settings) -> tuple[dict[str, Any], dict[str, list[Row]]]:
    """Run every scenario; returns the JSON-ready result and each scenario's rows (with images) for the report."""
    from tqdm import tqdm

    from .env import environment, load_average

    started = time.time()
    peaks: dict[str, dict[str, Any]] = {}
    settings_out = {"runs": settings.runs, "warmup": settings.warmup, "device": str(settings.device),
                    "count_flops": settings.count_flops}
    out: dict[str, Any] = {"settings": settings_out, "environment": environment(settings.device), "peaks": peaks,
                           "scenarios": []}
    rows: dict[str, list[Row]] = {}
    total = sum(len(s.presets) for s in scenarios)
    with tqdm(total=total, desc="bench", unit="preset", disable=not settings.progress, leave=False) as bar:
        for sc in scenarios:
            def start(preset: str, name: str = sc.name) -> None:
                bar.set_description(f"{name}/{preset}")

            def done(row: Row, name: str = sc.name) -> None:
                bar.update(1)
                if row.status != "ok":
                    tqdm.write(f"[{name}] {row.preset}: skipped ({row.reason})", file=sys.stderr)

            run = ScenarioRun(sc, settings, peaks, on_start=start, on_done=done)
            run.run()
            out["scenarios"].append(run.result(settings.count_reference))
            rows[sc.name] = run.rows
    out["duration_s"] = time.time() - started
    out["environment"]["load_average_end"] = load_average()
    return out, rows
