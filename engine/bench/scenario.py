"""Benchmark scenarios as data: engine/bench/scenarios/<name>.yaml (shipped as package data), resolved for one scale
into a typed `Scenario`.

A scenario names one job per scale (tiny/small random-weight models, or the real model id) and the presets to compare
on it: the stock pipeline in fp32 (the baseline: quality is measured against it), the stock pipeline in bf16 (what a
user would otherwise run on hardware with native bf16: every speed-up is given against both) and engine presets (an
optimization level plus overrides, a few-step scheduler, an export backend). Keeping them as data means a new
comparison is a YAML file, not code.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

SCALES = ("tiny", "small", "real")
# What each task's jobs are split into (the stage timers' names: pipelines report them, probes mark them on stock).
STAGES = {"text-to-image": ("encode", "denoise", "decode"), "upscale": ("preprocess", "tiles", "stitch")}
# Image generation modes (text-to-image task): the inputs engine/bench/inputs.py draws for each, and whether the
# job names a ControlNet. "controlnet" is text-to-image guided by one ControlNet.
MODES = ("text2img", "img2img", "inpaint", "controlnet")


def scenarios_dir() -> Path:
    """The shipped scenarios: engine/bench/scenarios, package data installed with the wheel (like engine/configs)."""
    return Path(__file__).resolve().parent / "scenarios"


@dataclass(frozen=True)
class Preset:
    """One way to run the scenario's job. `stock` is the diffusers pipeline; otherwise an `Engine` configuration."""

    name: str
    stock: bool = False
    dtype: str = "fp32"  # stock presets: the dtype the stock pipeline is loaded in (fp32 is the baseline)
    opt_level: str = "O0"
    compile_config: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    steps: int | None = None  # overrides the scenario's (few-step presets)
    guidance_scale: float | None = None
    overlapping_tiles: bool | None = None  # upscale: second, half-tile-offset pass blended in
    shared_style: bool | None = None  # upscale: one style per call (precomputed modulated weights)
    quick: bool = True  # part of a --quick run
    requires: tuple[str, ...] = ()  # "cuda", "bf16" (native bf16), or importable packages: checked before loading
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", tuple(self.requires))
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise TypeError(f"preset {self.name}: dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.dtype != "fp32" and not self.stock:
            raise TypeError(f"preset {self.name}: dtype is for stock presets (engine presets: compile_config dtype)")

    @property
    def baseline(self) -> bool:
        """The stock pipeline in fp32: the reference every quality figure and the first speed-up are taken against."""
        return self.stock and self.dtype == "fp32"

    def missing_requirement(self, device: "torch.device") -> str | None:
        """Why this preset cannot run on `device` here, or None."""
        import importlib.util

        for need in self.requires:
            if need == "cuda":
                if device.type != "cuda":
                    return f"needs a CUDA device (device is {device.type})"
            elif need == "bf16":
                from .env import native_bf16

                ok, detail = native_bf16(device)
                if not ok:
                    return f"needs native bf16 ({detail}); a stock bf16 run here would time emulation"
            elif importlib.util.find_spec(need) is None:
                return f"needs the {need!r} package (not installed)"
        return None

    @property
    def backend(self) -> str:
        return str(self.compile_config.get("backend", "torch"))


@dataclass(frozen=True)
class Job:
    """What one preset runs: every field the images depend on (same job + same seed = comparable images). For an
    upscale job, width x height is the input image (drawn from the seed) and the text-to-image fields are unused."""

    model: str
    width: int
    height: int
    steps: int = 1
    guidance_scale: float | None = None
    seed: int = 0
    prompt: str = ""
    num_images: int = 1
    scheduler: str | None = None
    task: str = "text-to-image"
    overlapping_tiles: bool = False
    shared_style: bool = False
    mode: str = "text2img"  # one of MODES; image inputs are drawn from seed and size (engine/bench/inputs.py)
    strength: float | None = None  # img2img / inpaint (None: the diffusers class default)
    controlnet: str | None = None  # mode "controlnet": the ControlNet's model id
    conditioning_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TypeError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.mode == "controlnet") != (self.controlnet is not None):
            raise TypeError("mode controlnet needs a controlnet model id (and only it takes one)")

    def key(self) -> tuple[Any, ...]:
        """All fields in order (`Job(*key)` rebuilds the job)."""
        return astuple(self)

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[self.task]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    scale: str
    job: Job
    presets: tuple[Preset, ...]
    reference_jobs: tuple[str, ...] = ()  # ids in engine.bench.reference.PUBLISHED_JOBS to project
    source: str = ""
    preset_names: tuple[str, ...] = ()  # every preset the file defines (before --quick / --presets filtering)

    def job_for(self, preset: Preset) -> Job:
        """The job `preset` runs: the scenario's, with the preset's steps (never more), guidance and scheduler, or
        for an upscale its tiling options."""
        if self.job.task == "upscale":
            flags = {k: v for k, v in (("overlapping_tiles", preset.overlapping_tiles),
                                       ("shared_style", preset.shared_style)) if v is not None}
            return replace(self.job, **flags)
        steps = preset.steps if preset.steps is not None else self.job.steps
        guidance = preset.guidance_scale if preset.guidance_scale is not None else self.job.guidance_scale
        return replace(self.job, steps=min(steps, self.job.steps), guidance_scale=guidance,
                       scheduler=preset.scheduler or self.job.scheduler)


def scenario_paths(names: list[str] | None = None) -> list[Path]:
    """The default scenarios (every YAML in scenarios_dir() with `default: true`), or the given names / paths."""
    if not names:
        paths = sorted(scenarios_dir().glob("*.yaml"))
        return [p for p in paths if _read(p).get("default", True)]
    out = []
    for name in names:
        path = Path(name)
        if not path.suffix:
            path = scenarios_dir() / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(scenarios_dir().glob("*.yaml")))
            raise FileNotFoundError(f"no scenario {name!r} (known, in {scenarios_dir()}: {known}; "
                                    "or give a path to a YAML file)")
        out.append(path)
    return out


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_scenario(path: Path, scale: str, *, quick: bool = False, model: str | None = None,
                  steps: int | None = None, only: list[str] | None = None) -> Scenario:
    """Resolve `path` for `scale`: the scale's job, with --quick's overrides, then an explicit model id / steps;
    `only` keeps the presets of those names (the CLI checks that each name is some scenario's)."""
    data = _read(path)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    scales = data.get("scales", {})
    if scale not in scales:
        raise ValueError(f"scenario {path.stem} has no {scale!r} scale (has: {', '.join(scales)})")
    task = data.get("task", "text-to-image")
    if task not in STAGES:
        raise ValueError(f"scenario {path.stem}: task must be one of {', '.join(STAGES)}, got {task!r}")
    job_fields: dict[str, Any] = {"guidance_scale": data.get("guidance_scale"), "prompt": data.get("prompt", "a photo"),
                                  "seed": data.get("seed", 0), "num_images": data.get("num_images", 1),
                                  "scheduler": data.get("scheduler"), "task": task,
                                  **{k: data[k] for k in ("mode", "strength", "controlnet", "conditioning_scale")
                                     if k in data},
                                  **scales[scale]}
    quick_over = dict(data.get("quick", {})) if quick else {}
    job_fields.update({k: v for k, v in quick_over.items() if k in ("steps", "width", "height")})
    if model is not None:
        job_fields["model"] = model
    if steps is not None and task == "text-to-image":
        job_fields["steps"] = steps
    try:
        job = Job(**job_fields)
        presets = tuple(Preset(**p) for p in data.get("presets", []))
    except TypeError as e:  # an unknown or missing key in the YAML: name the file, not a traceback
        raise ValueError(f"scenario {path.stem}: {e}") from None
    if quick:
        presets = tuple(p for p in presets if p.quick)
    if only:
        presets = tuple(p for p in presets if p.name in only)
    for dtype in ("fp32", "bf16", "fp16"):
        if sum(p.stock and p.dtype == dtype for p in presets) > 1:
            raise ValueError(f"scenario {path.stem}: at most one stock preset per dtype ({dtype})")
    # The baseline runs first (every other preset's quality is measured against its images), then stock bf16.
    presets = tuple(sorted(presets, key=lambda p: (not p.baseline, not p.stock)))
    return Scenario(name=data.get("name", path.stem), description=data.get("description", ""), scale=scale, job=job,
                    presets=presets, reference_jobs=tuple(data.get("reference_jobs", [])), source=str(path),
                    preset_names=tuple(p.get("name", "") for p in data.get("presets", [])))
