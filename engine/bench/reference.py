"""Published reference numbers (../shared/REFERENCE_NUMBERS.md) as data, with their FLOPs counted here.

The FLOPs of each published job are counted by the harness itself: the real architecture (configs/arch/...) is built
on the meta device, so no weights and no compute are needed, and one forward runs under FlopCounterMode. From them:
the FLOP floor on the device in use (FLOPs / the measured matmul peak) and a projection of each published job from
the utilisation this run measured, printed beside the published times ("A6000: ~18 s (published)").
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..paths import cache_dir, configs_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedRun:
    gpu: str
    setup: str
    seconds: float | None  # None for rows published as a rate (it/s)
    source: str
    approx: bool = False
    rate: str | None = None  # the published figure when it is not a time


@dataclass(frozen=True)
class PublishedJob:
    id: str
    title: str
    arch: str  # folder under configs/arch/
    component: str  # the denoiser counted
    width: int
    height: int
    forwards: int  # denoiser forwards at batch 1 per job: steps x (2 with classifier-free guidance)
    published_flops: float | None  # as published (None: not published, counted only)
    runs: tuple[PublishedRun, ...]
    few_step: bool = False  # a distilled few-step job: projected from few-step presets too


_FLUX_SRC = "chengzeyi/ParaAttention README"
_FAL_SRC = '"What is Fal AI: A Beginner Guide"'
_PARA_SRC = "chengzeyi/ParaAttention doc/fastest_flux.md"
_FAST_SRC = "huggingface/flux-fast README"
PUBLISHED_JOBS: dict[str, PublishedJob] = {
    j.id: j
    for j in (
        PublishedJob(
            "flux-dev-1024-28", "FLUX.1-dev 1024², 28 steps, guidance 3.5", "flux-dev", "transformer", 1024, 1024,
            28, 74.4e12 * 28,
            (PublishedRun("RTX A6000", "stock diffusers, bf16", 18.0, _FAL_SRC, approx=True),
             PublishedRun("fal.ai hosted", "fal's engine (inference only)", 2.76, _FAL_SRC),
             PublishedRun("A100 80G", "diffusers bf16", 13.84, _FLUX_SRC),
             PublishedRun("A100 80G", "diffusers bf16 + torch.compile", 10.00, _FLUX_SRC),
             PublishedRun("H100", "diffusers bf16", 6.71, "xdit-project/xDiT docs/performance/flux.md"),
             PublishedRun("H100", "diffusers bf16 + torch.compile", 4.30, "xdit-project/xDiT docs/performance/flux.md"),
             PublishedRun("L20", "baseline", 26.36, _PARA_SRC),
             PublishedRun("L20", "first-block cache + fp8 + compile", 7.56, _PARA_SRC),
             PublishedRun("L20", "flux-fast baseline", 24.94, _FAST_SRC),
             PublishedRun("L20", "flux-fast: compile + fp8 + cache (PSNR 23.2)", 7.42, _FAST_SRC))),
        PublishedJob(
            "sdxl-1024-30-cfg", "SDXL 1024², 30 steps, CFG", "sdxl", "unet", 1024, 1024, 60, 6.76e12 * 60,
            tuple(PublishedRun("A100 80G", setup, s, "huggingface/diffusion-fast results")
                  for setup, s in (("fp32", 7.36), ("bf16", 4.63), ("bf16 + SDPA", 3.32), ("+ torch.compile", 2.54),
                                   ("+ fused QKV", 2.52), ("+ int8 dynamic quant", 2.43)))
            + (PublishedRun("A100", "PyTorch", 3.70, "stabilityai/stable-diffusion-xl-1.0-tensorrt"),
               PublishedRun("A100", "TensorRT", 2.74, "stabilityai/stable-diffusion-xl-1.0-tensorrt"),
               PublishedRun("H100", "PyTorch", 2.50, "stabilityai/stable-diffusion-xl-1.0-tensorrt"),
               PublishedRun("H100", "TensorRT", 1.47, "stabilityai/stable-diffusion-xl-1.0-tensorrt"),
               PublishedRun("A100", "torch / torch.compile / stable-fast (UNet)", None, "chengzeyi/stable-fast README",
                            rate="8.7 / 10.0 / 11.9 it/s"),
               PublishedRun("H100", "torch / torch.compile / stable-fast (UNet)", None, "chengzeyi/stable-fast README",
                            rate="14.9 / 18.5 / 21.6 it/s"))),
        PublishedJob(
            "sdxl-lcm-1024-4", "SDXL + LCM 1024², 4 steps (no CFG)", "sdxl", "unet", 1024, 1024, 4, 6.76e12 * 4,
            (PublishedRun("A100", "TensorRT", 0.426, "stabilityai/stable-diffusion-xl-1.0-tensorrt"),
             PublishedRun("H100", "TensorRT", 0.234, "stabilityai/stable-diffusion-xl-1.0-tensorrt")), few_step=True),
        PublishedJob(
            "sdxl-turbo-512-4", "SDXL-Turbo 512², 4 steps (no CFG)", "sdxl", "unet", 512, 512, 4, None,
            (PublishedRun("A100", "TensorRT", 0.139, "stabilityai/sdxl-turbo-tensorrt"),
             PublishedRun("H100", "TensorRT", 0.084, "stabilityai/sdxl-turbo-tensorrt")), few_step=True),
    )
}

# AuraSR has published FLOPs but no published time: listed for the table, not projected.
AURASR_FLOPS = {"per 64→256 tile": 238e9, "1024² → 4096², 256 tiles": 61e12, "overlapped, 545 tiles": 130e12}

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts), for the implied utilisation of published runs.
DATASHEET_BF16_PEAK = {"A100": 312e12, "A100 80G": 312e12, "H100": 989e12}


# -- counting on the meta device -------------------------------------------------------------------------------------

def _flux_inputs(cfg: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    img, txt = (width // 16) * (height // 16), 512  # packed 2x2 latents; FLUX.1-dev's 512 T5 tokens
    return dict(hidden_states=torch.empty(1, img, cfg["in_channels"]),
                encoder_hidden_states=torch.empty(1, txt, cfg["joint_attention_dim"]),
                pooled_projections=torch.empty(1, cfg["pooled_projection_dim"]), timestep=torch.ones(1),
                guidance=torch.ones(1) if cfg.get("guidance_embeds") else None,
                img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3))


def _unet_inputs(cfg: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    return dict(sample=torch.empty(1, cfg["in_channels"], height // 8, width // 8), timestep=torch.ones(1),
                encoder_hidden_states=torch.empty(1, 77, cfg["cross_attention_dim"]),
                added_cond_kwargs={"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)})


_INPUTS: dict[str, Callable[[dict[str, Any], int, int], dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux_inputs, "UNet2DConditionModel": _unet_inputs}


def count_forward_flops(arch: str, component: str, width: int, height: int) -> int:
    """FLOPs of one batch-1 forward of the real architecture's denoiser, built on the meta device."""
    import diffusers

    from .metrics import flop_counter_mode

    cfg = json.loads((configs_dir() / "arch" / arch / component / "config.json").read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(cfg)
        inputs = _INPUTS[cfg["_class_name"]](cfg, width, height)
    counter = flop_counter_mode()
    with torch.no_grad(), counter:
        model(**inputs)
    return int(counter.get_total_flops())


def _cache_key(job: PublishedJob) -> str:
    import diffusers

    cfg = (configs_dir() / "arch" / job.arch / job.component / "config.json").read_bytes()
    raw = f"{job.arch}/{job.component}/{job.width}x{job.height}/{torch.__version__}/{diffusers.__version__}"
    return hashlib.sha256(raw.encode() + cfg).hexdigest()[:16]


def counted_flops(job: PublishedJob, *, compute: bool = True) -> int | None:
    """The job's denoiser FLOPs counted here (forwards x one forward), cached on disk; None if counting fails, or if
    it is not cached and `compute` is False (a --quick run: a few seconds per job saved)."""
    path = cache_dir() / "bench" / "reference_flops.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    key = _cache_key(job)
    if key not in cache:
        if not compute:
            return None
        try:
            cache[key] = count_forward_flops(job.arch, job.component, job.width, job.height)
        except Exception as e:  # a diffusers change must not sink the run: fall back to the published figure
            log.warning("counting %s on the meta device failed: %s", job.id, e)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    return int(cache[key]) * job.forwards


# -- floor and projections -------------------------------------------------------------------------------------------

def project(job_id: str, peaks: dict[str, float], presets: list[dict[str, Any]], *,
            count: bool = True) -> dict[str, Any]:
    """The published job on this device: its FLOPs, the floor at the measured peak, and the time each measured preset
    would take at the utilisation it reached here. `peaks` maps dtype -> FLOP/s; `presets` are result rows with
    `preset`, `dtype`, `utilisation` and `job_differs`: presets running their own (few-step) job project only the
    published few-step jobs."""
    job = PUBLISHED_JOBS[job_id]
    counted = counted_flops(job, compute=count)
    flops = counted if counted is not None else job.published_flops
    out: dict[str, Any] = {"job": job.id, "title": job.title, "flops_counted": counted,
                           "flops_published": job.published_flops, "flops": flops, "floor_s": {}, "projected_s": {},
                           "published": [r.__dict__ for r in job.runs], "implied_utilisation": {}}
    if flops is None:
        return out
    out["floor_s"] = {dtype: flops / peak for dtype, peak in peaks.items() if peak}
    for row in presets:
        if row.get("job_differs") and not job.few_step:
            continue
        util, dtype = row.get("utilisation"), row.get("dtype")
        if util and dtype in peaks:
            out["projected_s"][row["preset"]] = flops / (peaks[dtype] * util)
    for run in job.runs:
        peak = DATASHEET_BF16_PEAK.get(run.gpu)
        if peak and run.seconds:
            out["implied_utilisation"][f"{run.gpu}, {run.setup}"] = flops / (run.seconds * peak)
    return out


def published_line(run: dict[str, Any]) -> str:
    """One published row as printed beside our projection, e.g. "RTX A6000: ~18 s (published; stock diffusers...)"."""
    figure = run["rate"] if run["seconds"] is None else f"{'~' if run['approx'] else ''}{run['seconds']:g} s"
    return f"{run['gpu']}: {figure} (published; {run['setup']}; {run['source']})"


__all__ = ["AURASR_FLOPS", "PUBLISHED_JOBS", "PublishedJob", "PublishedRun", "count_forward_flops", "counted_flops",
           "project", "published_line"]
