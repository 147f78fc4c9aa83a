"""Named scheduler presets, built on diffusers' schedulers from the model's own scheduler config.

A preset is a scheduler class plus the config fields that define it (spacing, Karras sigmas, solver type). It is
applied per call with `Cls.from_config(model_scheduler_config, **overrides)`, which keeps the model's training
schedule (betas, prediction type, flow shift) and changes only how it is sampled. Each family accepts the presets
that fit its training objective: epsilon/v-prediction schedulers for SD 1.5 and SDXL, flow matching for FLUX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError

SD_FAMILIES = ("sd15", "sdxl")
FLOW_FAMILIES = ("flux",)


@dataclass(frozen=True)
class SchedulerPreset:
    name: str
    class_name: str
    description: str
    families: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, SchedulerPreset] = {p.name: p for p in [
    SchedulerPreset("euler", "EulerDiscreteScheduler", "Euler", SD_FAMILIES),
    SchedulerPreset("euler_a", "EulerAncestralDiscreteScheduler", "Euler ancestral (stochastic)", SD_FAMILIES),
    SchedulerPreset("ddim", "DDIMScheduler", "DDIM", SD_FAMILIES),
    SchedulerPreset("pndm", "PNDMScheduler", "PNDM (PLMS), SD 1.5's original sampler", SD_FAMILIES,
                    {"skip_prk_steps": True}),
    SchedulerPreset("unipc", "UniPCMultistepScheduler", "UniPC multistep", SD_FAMILIES),
    SchedulerPreset("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M", SD_FAMILIES,
                    {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    SchedulerPreset("dpmpp_2m_karras", "DPMSolverMultistepScheduler", "DPM++ 2M with Karras sigmas", SD_FAMILIES,
                    {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    SchedulerPreset("dpmpp_sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE (stochastic)", SD_FAMILIES,
                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    SchedulerPreset("lcm", "LCMScheduler", "LCM (latent consistency; LCM-LoRA / LCM UNets, 2-8 steps)", SD_FAMILIES),
    SchedulerPreset("tcd", "TCDScheduler", "TCD (trajectory consistency distillation, 2-8 steps)", SD_FAMILIES),
    SchedulerPreset("euler_trailing", "EulerDiscreteScheduler", "Euler, trailing spacing (SDXL-Lightning, Turbo)",
                    SD_FAMILIES, {"timestep_spacing": "trailing"}),
    SchedulerPreset("euler_a_trailing", "EulerAncestralDiscreteScheduler",
                    "Euler ancestral, trailing spacing (SDXL-Turbo)", SD_FAMILIES, {"timestep_spacing": "trailing"}),
    SchedulerPreset("euler_trailing_x0", "EulerDiscreteScheduler",
                    "Euler, trailing spacing, x0 prediction (1-step SDXL-Lightning)", SD_FAMILIES,
                    {"timestep_spacing": "trailing", "prediction_type": "sample"}),
    SchedulerPreset("dpm_singlestep_trailing", "DPMSolverSinglestepScheduler",
                    "DPM singlestep, trailing spacing (SDXL-Flash)", SD_FAMILIES, {"timestep_spacing": "trailing"}),
    SchedulerPreset("flow_match_euler", "FlowMatchEulerDiscreteScheduler",
                    "Flow-matching Euler with the model's (resolution-dependent) shift", FLOW_FAMILIES),
]}


def presets_for(family: str) -> list[str]:
    return [name for name, p in PRESETS.items() if family in p.families]


def get_preset(name: str, family: str) -> SchedulerPreset:
    preset = PRESETS.get(name)
    if preset is None:
        raise InvalidRequestError("scheduler", f"unknown scheduler {name!r}", ", ".join(presets_for(family)), name)
    if family not in preset.families:
        raise InvalidRequestError("scheduler", f"{name!r} does not fit {family} models",
                                  ", ".join(presets_for(family)), name)
    return preset


def build_scheduler(name: str, family: str, base_config: Any) -> Any:
    """A scheduler of preset `name` built from the model's scheduler config."""
    import diffusers

    preset = get_preset(name, family)
    cls = getattr(diffusers, preset.class_name)
    return cls.from_config(base_config, **preset.overrides)
