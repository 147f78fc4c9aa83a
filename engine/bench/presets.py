"""How one preset runs: the stock diffusers pipeline (with hook-based stage timers) or an `Engine` configuration;
warm-up runs, timed runs, peak memory. A preset asking for an export backend that the optimization report shows was
not applied is refused here (PresetSkipped), so a silent fallback to torch is never timed as that backend.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .metrics import BoundaryProbe, FlopCount, PeakMemory, StageProbe, TileProbe, count_flops, summarize, timed
from .scenario import Job, Preset

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class PresetSkipped(Exception):
    """A preset that cannot run here, with the reason (e.g. a GPU-only backend on a CPU)."""


@dataclass
class Settings:
    device: torch.device
    runs: int = 3
    warmup: int = 1
    count_flops: bool = True
    count_reference: bool = True  # count the published jobs' FLOPs on the meta device (cached on disk)
    progress: bool = True


@dataclass
class Row:
    """One preset's figures. `images` (last timed run) stay in memory for the quality columns and the report."""

    preset: str
    kind: str
    description: str
    job: dict[str, Any]
    status: str = "ok"
    reason: str | None = None
    dtype: str | None = None
    load_s: float | None = None
    first_image_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # median_s, p90_s, min_s, runs
    stages_s: dict[str, float] = field(default_factory=dict)  # median per stage
    memory: dict[str, Any] = field(default_factory=dict)
    flops_per_image: float | None = None
    flops_stages: dict[str, int] = field(default_factory=dict)
    peak_flops_per_s: float | None = None
    achieved_flops_per_s: float | None = None
    utilisation: float | None = None
    speedup: float | None = None
    psnr_db: float | None = None  # None with identical=True when the images are bit-identical (PSNR is infinite)
    ssim: float | None = None
    identical: bool | None = None
    job_differs: bool = False  # a preset with its own steps/guidance/scheduler (few-step): not the baseline's job
    psnr_same_job_db: float | None = None  # against the stock pipeline running this preset's own job
    ssim_same_job: float | None = None
    optimization_report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    images: list[Image.Image] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        return d


Call = Callable[[], tuple[list[Image.Image], dict[str, float]]]


def repeat(call: Call, settings: Settings, row: Row, stages: tuple[str, ...]) -> None:
    """Warm-up runs (the first is the first-image figure: it pays compilation), then the timed runs."""
    first = None
    for _ in range(settings.warmup):
        dt, _out = timed(call, settings.device)
        first = dt if first is None else first
    per_run: list[dict[str, float]] = []
    for _ in range(max(1, settings.runs)):
        dt, (images, stage_times) = timed(call, settings.device)
        row.times_s.append(dt)
        per_run.append(stage_times)
        row.images = images
    row.first_image_s = first if first is not None else row.times_s[0]
    row.timing = summarize(row.times_s)
    row.stages_s = {s: sorted(t.get(s, 0.0) for t in per_run)[len(per_run) // 2] for s in stages}


class StockRunner:
    """The stock diffusers pipeline around the model's components, with stage boundaries from hooks.

    Built with `build_stock_pipeline` on the components our loader produced, so baseline and presets share the exact
    weights (and any model the engine can load, single files and presets included, has a baseline)."""

    def __init__(self, model: str, device: torch.device):
        from ..loading import load_model
        from ..loading.stock import build_stock_pipeline

        self.device = device
        self.loaded = load_model(model)
        self.pipe = build_stock_pipeline(self.loaded.family.name, self.loaded.components)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        comps = self.loaded.components
        self.probe = StageProbe(comps[self.loaded.family.denoiser], comps["vae"], device)
        self._params = set(inspect.signature(self.pipe.__call__).parameters)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.loaded.components[self.loaded.family.denoiser].parameters()).dtype

    def _kwargs(self, job: Job) -> dict[str, Any]:
        d = self.loaded.spec.defaults
        guidance = job.guidance_scale if job.guidance_scale is not None else d.guidance_scale
        kw: dict[str, Any] = dict(prompt=job.prompt, width=job.width, height=job.height,
                                  num_inference_steps=job.steps, num_images_per_prompt=job.num_images,
                                  guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(job.seed))
        if "max_sequence_length" in self._params and d.max_sequence_length:
            kw["max_sequence_length"] = min(d.max_sequence_length, 512)  # as the engine resolves it
        return kw

    def _set_scheduler(self, job: Job) -> None:
        from ..pipelines.base import fresh_scheduler

        self.pipe.scheduler = fresh_scheduler(self.loaded.components["scheduler"], job.scheduler,
                                              self.loaded.family.name)

    def call(self, job: Job) -> Call:
        def run() -> tuple[list[Image.Image], dict[str, float]]:
            self._set_scheduler(job)
            self.probe.reset()
            start = time.perf_counter()
            images = self.pipe(**self._kwargs(job)).images
            end = time.perf_counter()
            return images, self.probe.split(start, end)[0]
        return run

    def count(self, job: Job) -> tuple[FlopCount, list[Image.Image]]:
        self._set_scheduler(job)
        flops, out = count_flops(lambda: self.pipe(**self._kwargs(job)).images, self.probe)
        return flops, out

    def close(self) -> None:
        self.probe.remove()
        del self.pipe


def stock_runner(job: Job, device: torch.device) -> Any:
    """The baseline of a job: the stock diffusers pipeline, or for upscaling the reference aura-sr package."""
    if job.task == "upscale":
        from .upscale import ReferenceUpscaler

        return ReferenceUpscaler(job.model, device)
    return StockRunner(job.model, device)


class EngineCounter:
    """Counts FLOPs on an O0 engine (eager, fp32): the fallback when the scenario has no working stock baseline."""

    def __init__(self, model: str, device: torch.device, task: str = "text-to-image"):
        from ..api import Engine

        self.engine = Engine(device=device, opt_level="O0")
        self.model = model
        if task == "upscale":
            self.probe: BoundaryProbe = TileProbe(self.engine._upscaler(model).pipeline.model, device)
        else:
            loaded = self.engine.load(model)
            self.probe = StageProbe(loaded.components[loaded.family.denoiser], loaded.components["vae"], device)

    def count(self, job: Job) -> tuple[FlopCount, list[Image.Image]]:
        if job.task == "upscale":
            from .upscale import input_image, upscale_kwargs

            image = input_image(job)
            return count_flops(lambda: [self.engine.upscale(image, **upscale_kwargs(job)).image], self.probe)
        return count_flops(lambda: self.engine.generate(**_engine_kwargs(job)).images, self.probe)

    def close(self) -> None:
        self.probe.remove()
        self.engine.unload(self.model)


def _engine_kwargs(job: Job) -> dict[str, Any]:
    kw: dict[str, Any] = dict(model=job.model, prompt=job.prompt, width=job.width, height=job.height,
                              num_inference_steps=job.steps, seed=job.seed, num_images=job.num_images)
    if job.guidance_scale is not None:
        kw["guidance_scale"] = job.guidance_scale
    if job.scheduler is not None:
        kw["scheduler"] = job.scheduler
    return kw


def check_backend(preset: Preset, report: Any) -> list[str]:
    """A preset asking for an export backend runs only if the optimization report shows that backend applied;
    otherwise it is skipped with the report's reason, so a silent fallback to torch is never timed as the backend.
    Returns notes on components the backend skipped while others ran on it."""
    backend = preset.backend
    if backend == "torch":
        return []
    related = [r for r in report.results if backend in r.name.lower() or backend in r.detail.lower()
               or "backend" in r.name.lower()]
    applied = [r for r in related if r.status == "applied" and backend in r.detail.lower()]
    skipped = [f"{r.name}: {r.detail}" for r in related if r.status == "skipped"]
    if not applied:
        reason = "; ".join(skipped) or (f"the optimization report has no {backend} pass (backend not implemented in "
                                        f"this build, or the config field is ignored)")
        raise PresetSkipped(f"{backend} not applied: {reason}")
    return skipped


def run_engine(preset: Preset, job: Job, settings: Settings, row: Row) -> None:
    from ..api import Engine

    missing = preset.missing_requirement(settings.device.type)
    if missing:
        raise PresetSkipped(missing)
    engine = Engine(device=settings.device, opt_level=preset.opt_level, compile_config=preset.compile_config or None)
    memory = PeakMemory(settings.device)
    try:
        with memory.measure():
            row.load_s, report = timed(lambda: engine.optimization_report(job.model), settings.device)  # loads it
            row.optimization_report = report.as_dict()
            row.notes += check_backend(preset, report)
            row.dtype = DTYPE_NAMES.get(_compute_dtype(engine, job))
            repeat(_engine_call(engine, job), settings, row, job.stages)
        row.memory = memory.as_dict()
    finally:
        engine.unload(job.model)


def _compute_dtype(engine: Any, job: Job) -> torch.dtype:
    if job.task == "upscale":
        return engine._upscaler(job.model).pipeline.dtype
    loaded = engine.load(job.model)
    return next(loaded.components[loaded.family.denoiser].parameters()).dtype


def _engine_call(engine: Any, job: Job) -> Call:
    if job.task == "upscale":
        from .upscale import input_image, upscale_kwargs

        image = input_image(job)

        def upscale() -> tuple[list[Image.Image], dict[str, float]]:
            result = engine.upscale(image, **upscale_kwargs(job))
            return [result.image], result.timings
        return upscale

    def generate() -> tuple[list[Image.Image], dict[str, float]]:
        result = engine.generate(**_engine_kwargs(job))
        return result.images, result.timings
    return generate
