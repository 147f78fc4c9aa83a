"""How one preset runs: the stock diffusers pipeline (with hook-based stage timers) or an `Engine` configuration;
load and warm-up (with peak memory), then timed runs taken round-robin over the loaded presets. A preset asking for
an export backend that the optimization report shows was not applied is refused here (PresetSkipped), so a silent
fallback to torch is never timed as that backend.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .inputs import engine_inputs, stock_inputs
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
    timing: dict[str, float] = field(default_factory=dict)  # median_s, p90_s, min_s, max_s, spread, runs
    stages_s: dict[str, float] = field(default_factory=dict)  # median per stage
    memory: dict[str, Any] = field(default_factory=dict)
    flops_per_image: float | None = None
    flops_stages: dict[str, int] = field(default_factory=dict)
    peak_flops_per_s: float | None = None
    achieved_flops_per_s: float | None = None
    utilisation: float | None = None
    speedup: float | None = None  # stock fp32 median / this median (same run)
    speedup_bf16: float | None = None  # stock bf16 median / this median (None: no stock bf16 row ran)
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


@dataclass
class Prepared:
    """A preset that is loaded and warmed up: `call` makes one image (set), `close` frees it."""

    row: Row
    call: Call
    close: Callable[[], None]
    stages: tuple[str, ...]
    per_run: list[dict[str, float]] = field(default_factory=list)

    def run_once(self, device: torch.device) -> None:
        """One timed run, recorded on the row."""
        dt, (images, stage_times) = timed(self.call, device)
        self.row.times_s.append(dt)
        self.per_run.append(stage_times)
        self.row.images = images

    def finish(self) -> None:
        """Median, spread and per-stage medians of the timed runs."""
        self.row.timing = summarize(self.row.times_s)
        n = len(self.per_run)
        self.row.stages_s = {s: sorted(t.get(s, 0.0) for t in self.per_run)[n // 2] for s in self.stages}


def warm_up(call: Call, settings: Settings, row: Row) -> None:
    """Warm-up runs; the first is the first-image figure (it pays compilation). With no warm-up, the first timed
    run stands in for it (set by `timed_rounds`)."""
    for _ in range(settings.warmup):
        dt, _out = timed(call, settings.device)
        row.first_image_s = dt if row.first_image_s is None else row.first_image_s


def timed_rounds(prepared: list[Prepared], settings: Settings, on_fail: Callable[[Prepared, BaseException], None]
                 ) -> None:
    """The timed runs, round-robin over the loaded presets: load from other work on a shared machine then falls on
    every preset alike, instead of on all the runs of one (a ratio of medians from one run stays fair)."""
    live = list(prepared)
    for _ in range(max(1, settings.runs)):
        for p in list(live):
            try:
                p.run_once(settings.device)
            except Exception as e:  # noqa: BLE001 - a preset failing mid-run is that preset's skip
                live.remove(p)
                on_fail(p, e)
    for p in live:
        if p.row.first_image_s is None:
            p.row.first_image_s = p.row.times_s[0]
        p.finish()


class StockRunner:
    """The stock diffusers pipeline around the model's components, with stage boundaries from hooks.

    Built with `build_stock_pipeline` on the components our loader produced, so baseline and presets share the exact
    weights (and any model the engine can load, single files and presets included, has a baseline). `dtype` is read
    straight into, as `from_pretrained(torch_dtype=...)` does: the stock bf16 run a user would otherwise make."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32, mode: str = "text2img",
                 controlnet: str | None = None):
        from ..loading import load_model
        from ..loading.controlnet import load_controlnet
        from ..loading.stock import build_stock_pipeline
        from ..pipelines.modes import mode_spec

        self.device = device
        self.loaded = load_model(model, torch_dtype=dtype)
        family = self.loaded.family.name
        # The diffusers class the engine composes for this mode (engine/pipelines/modes.py), built stock.
        spec = mode_spec(family, "text2img" if mode == "controlnet" else mode, controlnet is not None)
        self.control_image_arg = spec.control_image_arg
        components = dict(self.loaded.components)
        if controlnet is not None:
            components["controlnet"] = load_controlnet(controlnet, family=family, torch_dtype=dtype, device=device)
        self.pipe = build_stock_pipeline(family, components, spec.pipeline)
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
        kw: dict[str, Any] = dict(prompt=job.prompt, num_inference_steps=job.steps,
                                  num_images_per_prompt=job.num_images, guidance_scale=guidance,
                                  generator=torch.Generator("cpu").manual_seed(job.seed),
                                  **stock_inputs(job, self.control_image_arg))
        if "width" in self._params:  # not on img2img classes: the output follows the input image
            kw.update(width=job.width, height=job.height)
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


def stock_runner(job: Job, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """A stock run of a job: the diffusers pipeline, or for upscaling the reference aura-sr package, in `dtype`."""
    if job.task == "upscale":
        from .upscale import ReferenceUpscaler

        return ReferenceUpscaler(job.model, device, dtype)
    return StockRunner(job.model, device, dtype, job.mode, job.controlnet)


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
    kw: dict[str, Any] = dict(model=job.model, prompt=job.prompt, num_inference_steps=job.steps, seed=job.seed,
                              num_images=job.num_images, **engine_inputs(job))
    if "image" not in kw:  # with an input image the output follows it
        kw.update(width=job.width, height=job.height)
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


def prepare_engine(preset: Preset, job: Job, settings: Settings, row: Row) -> Prepared:
    """Load the model on an `Engine` configured by `preset`, check the backend it asked for, warm up. Memory is the
    peak over load and warm-up (what the preset allocates; the timed runs reuse it)."""
    from ..api import Engine

    missing = preset.missing_requirement(settings.device)
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
            call = _engine_call(engine, job)
            warm_up(call, settings, row)
        row.memory = memory.as_dict()
    except BaseException:
        engine.unload(job.model)
        raise
    return Prepared(row, call, lambda: engine.unload(job.model), job.stages)


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
