"""The Python API: `Engine.generate(...)` turns a typed request into images, loading and caching models on demand.

Thread safety: models are loaded under a lock (two threads asking for the same model load it once), and jobs on one
device run one at a time (a device lock), which is what a single GPU can do anyway. Validation happens before any
lock, so bad input fails fast and never blocks other callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from .compiler import CompileConfig, OptimizationReport, optimize, resolve_config
from .compiler.compile import run_compiled
from .compiler.dtype import dtype_policy
from .errors import InsufficientMemoryError, InvalidRequestError, ModelNotFoundError, RefusedSourceError
from .families import FAMILIES
from .images import DEFAULT_MAX_PIXELS
from .loading import LoadedModel, available_offline, caller_policy, load_model
from .lora import LoraManager, resolve_lora
from .pipelines.base import GenerationParams, StepCallback, TextToImagePipeline
from .registry import find_spec, registry
from .requests import GenerateRequest, Result, UpscaleRequest, UpscaleResult, parse_request
from .runtime.device import resolve_device
from .runtime.planner import Planner, is_out_of_memory
from .runtime.queue import check_current_job, close_queue
from .schedulers import get_preset

log = logging.getLogger(__name__)


def _pipeline_class(path: str) -> type[TextToImagePipeline]:
    module_name, cls_name = path.split(":")
    return getattr(importlib.import_module(f"engine.pipelines.{module_name}"), cls_name)


class _Slot:
    """One loaded model placed on the engine's device by its memory plan, optimized by the compiler, with its
    pipeline. Components are loaded straight into their planned dtypes (`DtypePolicy`) and reach the device already
    cast, one at a time."""

    def __init__(self, model: str, device: torch.device, config: CompileConfig, *, allow_pickle: bool,
                 single_file_config: str | None, planner: Planner, plan: Any = None):
        policy = dtype_policy(config, device)
        if plan is None:
            plan = planner.plan_before_load(model, single_file_config, policy)
        if plan is not None:
            policy = planner.load_policy(policy, plan)  # e.g. NF4 weights, which only the loader can make
        loaded = load_model(model, torch_dtype=policy, allow_pickle=allow_pickle, config=single_file_config)
        if plan is None:  # a model the planner cannot size from configs alone: size the loaded weights
            plan = planner.plan_loaded(loaded, policy)
        self.loaded = loaded
        self.config = config
        self.plan = plan
        placement_notes: list[str] = []

        def place(components: dict[str, Any]) -> None:
            placement_notes.extend(planner.place(components, loaded.family, plan))

        if planner.places_before_passes(plan):
            place(loaded.components)  # resident weights: the passes rewrite them on the device, as before
            place_hook = None
        else:
            place_hook = place  # offload hooks wrap the final modules: weight rewrites run on the host first
        self.report, state = optimize(loaded.components, loaded.family, device, config,
                                      state={"dtype_policy": policy, "memory_plan": plan}, place=place_hook)
        self.report.memory_plan = planner.describe(plan) + placement_notes
        self.pipeline = _pipeline_class(loaded.family.pipeline)(loaded.components, device, loaded.pipeline_config)
        self.pipeline.prompt_cache = state.get("prompt_cache")
        self.pipeline.run_context = state.get("run_context")
        self.pipeline.encode_scope = planner.encode_scope(loaded.components, loaded.family, plan)
        self.exported: dict[str, str] = dict(state.get("backend", {}))  # component -> backend running its graph
        self.cfg_parallel = state.get("cfg_parallel")  # the UNet's copy on a second device (compiler pass parallel)
        self.loras: LoraManager | None = None  # created on the first request with adapters
        self.source = (model, allow_pickle, single_file_config)
        self._compiled_adjuncts: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # see compile_controlnets

    def compile_controlnets(self, params: GenerationParams) -> None:
        """A request's ControlNets get the denoiser's compile treatment (engine/compiler/compile.py), once each;
        the report says what each got."""
        from .compiler.compile import compile_like_denoiser

        denoiser = self.loaded.components[self.loaded.family.denoiser]
        plan = getattr(self.pipeline.run_context, "plan", None)
        for control in params.controls:
            if control.model in self._compiled_adjuncts:
                continue
            applied, detail = compile_like_denoiser(control.model, denoiser, plan)
            (self.report.applied if applied else self.report.skipped)("compile", f"request {detail}")
            self._compiled_adjuncts.add(control.model)

    def drop(self) -> None:
        """Take the placement off a slot the engine drops: offload hooks and the swap groups (whose handles chain a
        cached ControlNet / image encoder to this model's modules) and the CFG-parallel copy, so nothing cached
        keeps the model alive once the engine lets go of it."""
        from .runtime.placement import reset_placement

        if self.cfg_parallel is not None:
            self.cfg_parallel.remove()
            self.cfg_parallel = None
        reset_placement(self.loaded.components, quiet=True, to_host=False)  # freed next, not moved

    def lora_manager(self) -> LoraManager:
        if self.loras is None:
            compiled = bool(self.config.compile)
            self.loras = LoraManager(self.loaded.family.name, self.loaded.components,
                                     hotswap_rank=self.config.lora_hotswap_rank if compiled else None,
                                     fuse_after=0 if getattr(self.plan, "offloads", False) else
                                     self.config.lora_fuse_after)  # offloaded weights: never merge into them
        return self.loras


class _UpscaleSlot:
    """A loaded upscaler: AuraSR in the compute dtype its optimization level asks for, channels-last from O1."""

    def __init__(self, model: str, device: torch.device, config: CompileConfig, allow_pickle: bool):
        from .compiler.dtype import BY_NAME
        from .loading.aurasr import load_aurasr
        from .pipelines.aurasr import AuraSRPipeline
        from .runtime.device import best_half_dtype

        spec = find_spec(model)
        if spec is not None and spec.family_spec.task != "upscale":
            raise ModelNotFoundError(model, f"is a {spec.family_spec.task} model; use Engine.generate",
                                     known=_upscale_ids())
        dtype = BY_NAME.get(config.dtype) or best_half_dtype(device) or torch.float32
        network = load_aurasr(model, allow_pickle=allow_pickle, torch_dtype=dtype)  # read straight into `dtype`
        self.report = OptimizationReport(config_hash=config.compute_hash(), device=str(device))
        if dtype == torch.float32:
            self.report.skipped("dtype", "fp32 (no half precision at this level or on this device)")
        else:
            self.report.applied("dtype", f"aurasr {str(dtype).removeprefix('torch.')} (modulation and demodulation "
                                "stay fp32)")
        if config.channels_last:
            network.to(memory_format=torch.channels_last)
            self.report.applied("channels_last", "aurasr convolutions")
        else:
            self.report.skipped("channels_last", "disabled in config")
        self.pipeline = AuraSRPipeline(network, device, dtype)


def _upscale_ids() -> list[str]:
    return sorted(k for k, s in registry().items() if s.family_spec.task == "upscale")



def _adjuncts(params: GenerationParams) -> dict[str, torch.nn.Module]:
    """The modules a job brings beside the model's, by the names the memory plan sizes and places them under."""
    out = {("controlnet" if i == 0 else f"controlnet_{i}"): c.model for i, c in enumerate(params.controls)}
    if params.ip_adapter is not None:
        out["image_encoder"] = params.ip_adapter.image_encoder
    return out


def _load_ip_adapter(source: Any, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Any], Any]:
    """An IP-Adapter's weights split as diffusers' `load_ip_adapter` splits a .safetensors file, and its CLIP image
    encoder as diffusers loads it (`image_encoder_folder` under the subfolder unless it names a path)."""
    from pathlib import PurePosixPath

    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(source.folder / source.subfolder / source.weight_name), framework="pt", device="cpu") as f:
        for key in f.keys():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = f.get_tensor(key)
    enc = source.image_encoder_folder
    subfolder = enc if "/" in enc else PurePosixPath(source.subfolder, enc).as_posix()
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(source.folder), subfolder=subfolder, dtype=dtype,
                                                            local_files_only=True)
    return state, encoder.to(device).eval()


class Engine:
    """Loads models by id or path and runs text-to-image and upscale jobs on one device. fal's API (`run`, `submit`,
    `subscribe`, `stream`) wraps an engine: `FalService(engine)` (engine/service.py)."""

    def __init__(self, device: str | torch.device = "auto", *, opt_level: str | None = None,
                 compile_config: CompileConfig | dict[str, Any] | None = None, allow_pickle: bool = False,
                 allow_private_urls: bool = False, max_memory: int | str | None = None,
                 max_loaded_models: int | None = None, allow_lossy_memory: bool = False,
                 memory_plan: str | None = None):
        """`opt_level` O0..O3 (configs/opt_levels.yaml); default O2 on CUDA, O0 (stock fp32) elsewhere.
        `compile_config` overrides fields of the level (a dict) or replaces it (a CompileConfig).

        Memory: each model gets the richest placement that fits the device budget (`max_memory`, e.g. "24GB", or
        the free device memory): resident, text encoders offloaded, model or group offload, and with
        `allow_lossy_memory` fp8 or quantized weight storage. Loaded models are evicted least-recently-used when a
        new one does not fit beside them, or when more than `max_loaded_models` would be loaded. `memory_plan`
        forces one rung of the ladder (e.g. "model_offload"; `engine plan` lists them)."""
        if max_loaded_models is not None and max_loaded_models < 1:
            raise InvalidRequestError("max_loaded_models", "must be at least 1", ">= 1", max_loaded_models)
        self.device = resolve_device(device)
        self.opt_level = opt_level or ("O2" if self.device.type == "cuda" else "O0")
        self.compile_config = resolve_config(self.opt_level, compile_config, self.opt_level)
        self.allow_pickle = allow_pickle
        self.allow_private_urls = allow_private_urls  # for URLs in requests (LoRAs, images): SSRF guard
        self._planner = Planner(self.device, max_memory, allow_lossy=allow_lossy_memory, memory_plan=memory_plan)
        self.max_loaded_models = max_loaded_models
        self._slots: dict[str, _Slot] = {}
        self._upscalers: dict[str, _UpscaleSlot] = {}
        self._last_used: dict[str, float] = {}  # model -> time of its last use, for LRU eviction
        self.max_input_pixels = DEFAULT_MAX_PIXELS  # upscale inputs larger than this are refused
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    # -- models -------------------------------------------------------------------------------------------------
    def load(self, model: str, *, allow_pickle: bool | None = None, config: str | None = None,
             opt_level: str | None = None, compile_config: CompileConfig | dict[str, Any] | None = None) -> LoadedModel:
        """Load `model` (registry id, folder, single file or hub id) unless already loaded; returns it.

        `config`: for a single file whose architecture matches no shipped config, a registry id or diffusers
        folder that describes it. `opt_level` / `compile_config` override the engine's for this model (a model
        already loaded with other settings is reloaded). Later `generate(model=...)` calls use the loaded model.
        """
        wanted = None
        if opt_level is not None or compile_config is not None:
            base = self.compile_config if opt_level is None and isinstance(compile_config, dict) else None
            wanted = (base.with_overrides(**compile_config) if base is not None and isinstance(compile_config, dict)
                      else resolve_config(opt_level, compile_config, self.opt_level))
        return self._slot(model, allow_pickle, config, wanted).loaded

    def _slot(self, model: str, allow_pickle: bool | None = None, config: str | None = None,
              compile_config: CompileConfig | None = None, plan: Any = None) -> _Slot:
        if compile_config is None and plan is None:
            slot = self._slots.get(model)  # a loaded model is served without waiting for another model's load
            if slot is not None:
                self._check_caller(model, slot)
                self._last_used[model] = time.monotonic()
                return slot
        with self._load_lock:
            slot = self._slots.get(model)
            if slot is not None and ((compile_config is not None and slot.config != compile_config)
                                     or plan is not None):
                with self._run_lock:
                    del self._slots[model]
                    slot.drop()
                del slot
                self._release()  # the old placement's memory, before the new one is planned
                slot = None
            if slot is None:
                pickle_ok = self.allow_pickle if allow_pickle is None else allow_pickle
                slot = self._build(model, pickle_ok, config, compile_config or self.compile_config, plan)
                self._slots[model] = slot
            self._check_caller(model, slot)
            self._last_used[model] = time.monotonic()
            return slot

    @staticmethod
    def _check_caller(model: str, slot: _Slot) -> None:
        """Models are cached by name: one a trusted caller loaded from a local path (say a folder `owner/name`) is
        not served to an untrusted caller who names `owner/name` (for them that is a hub id)."""
        policy = caller_policy()
        if slot.loaded.local and not policy.trusted and model not in policy.pinned:  # pinned: the operator's mapping
            raise RefusedSourceError("model_name", f"hub repository {model!r} is not in this server's model cache")

    def _build(self, model: str, allow_pickle: bool, config: str | None, wanted: CompileConfig,
               plan: Any) -> _Slot:
        """Plan (making room first), load and place; an out-of-memory error while placing steps down the ladder as
        one inside a job does (caller holds the load lock)."""
        if plan is None:
            plan = self._plan_with_room(model, config, dtype_policy(wanted, self.device))
        else:
            self._make_room(model, plan)
        notes: list[str] = []
        while True:
            failure = None
            try:
                slot = _Slot(model, self.device, wanted, allow_pickle=allow_pickle, single_file_config=config,
                             planner=self._planner, plan=plan)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if failure is None:
                slot.report.memory_plan.extend(notes)
                return slot
            self._release()  # outside the except block: the half-placed model is gone by now
            smaller = self._planner.next_plan(plan) if plan is not None else None
            if smaller is None:
                raise InsufficientMemoryError(f"{model}: out of memory on {self.device} while loading"
                                              f"{' with plan ' + self._planner.name(plan) if plan is not None else ''}"
                                              f" and no smaller memory plan is left: {failure}")
            log.warning("%s: out of memory while loading with plan %s; trying %s", model, self._planner.name(plan),
                        self._planner.name(smaller))
            notes.append(f"fallback at load: out of memory with {self._planner.name(plan)} ({failure}); stepped "
                         f"down to {self._planner.name(smaller)}")
            plan = smaller

    def _plan_with_room(self, model: str, config: str | None, policy: Any) -> Any:
        """The plan for a new model. A detected budget is the free memory now, which the loaded models already
        take from: when the model would get a poorer plan (or none) than with them gone, evict the least recently
        used ones first, one at a time, re-planning after each."""
        while True:
            others = [s.plan for k, s in self._slots.items() if k != model and s.plan is not None]
            reclaimable = sum(p.resident_bytes for p in others) if self._planner.max_memory is None else 0
            try:
                plan = self._planner.plan_before_load(model, config, policy)
            except InsufficientMemoryError:
                if self._evict_one(model, "no memory plan fits beside the loaded models"):
                    continue
                raise
            if plan is not None and reclaimable:
                alone = self._planner.plan_before_load(model, config, policy, extra_bytes=reclaimable)
                if alone is not None and alone.rung != plan.rung and self._evict_one(
                        model, f"it would get {self._planner.name(alone)} instead of {self._planner.name(plan)}"):
                    continue
            self._make_room(model, plan)
            return plan

    def _evict_one(self, model: str, why: str) -> bool:
        """Evict the least recently used model other than `model` (caller holds the load lock)."""
        loaded = [(k, d) for d in (self._slots, self._upscalers) for k in d if k != model]
        if not loaded:
            return False
        key, table = min(loaded, key=lambda kd: self._last_used.get(kd[0], 0.0))
        log.info("evicting %s (least recently used) to make room for %s: %s", key, model, why)
        with self._run_lock:
            dropped = table.pop(key, None)
            if isinstance(dropped, _Slot):
                dropped.drop()
        del dropped
        self._release()
        return True

    def _make_room(self, model: str, plan: Any) -> None:
        """Evict least-recently-used models (caller holds the load lock) until the count stays within
        `max_loaded_models` and, under an explicit `max_memory`, `plan` fits beside the rest."""
        while True:
            loaded = [k for d in (self._slots, self._upscalers) for k in d if k != model]
            too_many = self.max_loaded_models is not None and len(loaded) >= self.max_loaded_models
            others = [self._slots[k].plan for k in loaded if k in self._slots and self._slots[k].plan is not None]
            if not too_many and (plan is None or self._planner.fits_beside(plan, others)):
                return
            if not self._evict_one(model, "max_loaded_models" if too_many else "device memory (max_memory)"):
                return

    def _release(self) -> None:
        """Free what dropped models held; CUDA-graph pools too once no loaded model uses CUDA graphs."""
        graphs = any(s.report.status("cuda_graphs") == "applied" for s in self._slots.values())
        self._planner.release(keep_cuda_graphs=graphs)

    def unload_loras(self, model: str) -> None:
        """Remove every adapter from `model`: it is exactly the base model again."""
        slot = self._slot(model)
        with self._run_lock:
            if slot.loras is not None:
                with self._lora_change(slot):
                    slot.loras.unload()

    def optimization_report(self, model: str, *, load: bool = True) -> OptimizationReport | None:
        """What the compiler applied to `model` and what it skipped, with reasons. Loads the model if needed; with
        `load=False` only a loaded model is reported (None otherwise): a look that must not load or evict anything."""
        spec = find_spec(model)
        if spec is not None and spec.family_spec.task == "upscale":
            upscaler = self._upscaler(model) if load else self._upscalers.get(model)
            return upscaler.report if upscaler is not None else None
        slot = self._slot(model) if load else self._slots.get(model)
        if slot is None:
            return None
        stats = getattr(slot.pipeline.run_context, "stats", None)
        slot.report.compile_stats = stats.as_dict() if stats is not None else None
        return slot.report

    def compile_stats(self, model: str) -> dict[str, Any] | None:
        """Graphs compiled for `model` so far: jobs, graphs, recompiles and the recompile budget (None when the
        model is not compiled)."""
        scope = self._slot(model).pipeline.run_context
        stats = getattr(scope, "stats", None)
        return stats.as_dict() if stats is not None else None

    def warmup(self, model: str, sizes: list[tuple[int, int]] | None = None, *, num_images: int = 1) -> dict[str, float]:
        """Run one step at each (width, height) so compilation happens now, not in the first user request."""
        slot = self._slot(model)
        d = slot.loaded.spec.defaults
        timings = {}
        for width, height in sizes or [(d.width, d.height)]:
            res = self.generate(model=model, prompt="warmup", width=width, height=height, num_inference_steps=2,
                                num_images=num_images, seed=0)
            timings[f"{width}x{height}"] = res.timings["total"]
        return timings

    def unload(self, model: str) -> bool:
        """Drop a loaded model (and free its memory); False if it was not loaded."""
        with self._load_lock, self._run_lock:
            slot = self._slots.pop(model, None) or self._upscalers.pop(model, None)
            if isinstance(slot, _Slot):
                slot.drop()
        if slot is None:
            return False
        del slot
        self._release()  # collects the hooks' reference cycles, then empties the allocator's cache
        return True

    def loaded_models(self) -> list[str]:
        """The models loaded now. Lock-free: a load holds `_load_lock` for the whole build, and callers (a replica's
        answer counters, Serve's health check, /ui) must not wait for it; a slot enters the dicts only once built,
        and copying a dict's keys runs under the GIL without Python code in between, so the snapshot is consistent."""
        return [*tuple(self._slots), *tuple(self._upscalers)]

    @staticmethod
    def models() -> list[dict[str, Any]]:
        """The registry: id, family, task, source, description and whether it is available offline."""
        return [
            {"id": s.id, "family": s.family, "task": s.family_spec.task, "source": s.source,
             "description": s.description, "offline": available_offline(s)}
            for s in registry().values()
        ]

    # -- text to image ------------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, *, step_callback: StepCallback | None = None,
                 **kwargs: Any) -> Result:
        """Generate images. Pass a `GenerateRequest` or its fields as keywords (model=..., prompt=..., ...)."""
        if request is None:
            request = parse_request(GenerateRequest, kwargs)
        elif kwargs:
            raise InvalidRequestError("request", "pass either a GenerateRequest or keyword fields, not both")
        slot, params, loras = self._prepare(request)
        failure = None
        try:
            out = self._run(request.model, slot, loras, params, step_callback)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if failure is not None:  # outside the except block: the traceback's tensors are released by now
            failed = weakref.ref(slot)  # weak: the failed placement is freed before the reload
            del slot
            slot = self._fall_back(request.model, failed, failure)
            try:
                out = self._run(request.model, slot, loras, params, step_callback)  # once
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                raise InsufficientMemoryError(f"{request.model}: out of memory again after stepping down to "
                                              f"{self._planner.name(slot.plan)}: {type(e).__name__}") from None
        return Result(images=out.images, seed=params.seed, timings=out.timings, model=request.model,
                      width=params.width, height=params.height, num_inference_steps=params.num_inference_steps,
                      guidance_scale=params.guidance_scale, prompt=params.prompt)

    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[Result | Exception]:
        """Text-to-image requests that share model, size, steps, guidance and adapters as one batched model call
        (engine/scaleout/batched.py); each result equals its request's own `generate` (its seed, its generator).
        One result or exception per request, in order."""
        from .scaleout.batched import generate_batch

        return generate_batch(self, list(requests))

    def _prepare(self, request: GenerateRequest) -> tuple[_Slot, GenerationParams, list[Any]]:
        """A request checked and resolved against its model: (slot, params, resolved adapters)."""
        inputs = self._decode_images(request)  # before the model and the device: bad input fails fast
        slot = self._slot(request.model)
        params = self._resolve(request, slot.loaded, inputs)
        params = self._conditioning(request, slot, params, inputs)
        denoiser = slot.loaded.family.denoiser
        if request.loras and denoiser in slot.exported:
            raise InvalidRequestError("loras", f"the {denoiser} of {request.model} runs as an exported "
                                      f"{slot.exported[denoiser]} graph, which cannot take LoRA adapters; load it "
                                      "with backend='torch' to use LoRAs")
        if request.loras:
            self._check_lora_compatible(request.model, slot)
        # Fetch adapters before taking the device: a download must not hold up other jobs.
        loras = [resolve_lora(spec, i, allow_private_urls=self.allow_private_urls) for i, spec in enumerate(request.loras)]
        params = dataclasses.replace(params, lora_key=tuple((lo.sha256, lo.scale) for lo in loras))
        return slot, params, loras

    @staticmethod
    def _check_lora_compatible(model: str, slot: _Slot) -> None:
        """Adapters need float weights to split and wrap: refuse (422) what would otherwise fail inside PEFT."""
        reasons = []
        if slot.report.status("quant") == "applied":
            reasons.append(f"the compiler quantized its weights ({'; '.join(slot.report.details('quant'))}); load it "
                           "with compile_config={'quant': 'none'}")
        if getattr(slot.plan, "storage", None) == "fp8":
            reasons.append(f"its memory plan {slot.plan.rung} stores the weights in fp8; use a plan without fp8 "
                           "storage (more memory, or memory_plan=...)")
        if reasons:
            raise InvalidRequestError("loras", f"{model} cannot take LoRA adapters: " + "; ".join(reasons))

    def _run(self, model: str, slot: _Slot, loras: list[Any], params: GenerationParams,
             step_callback: StepCallback | None, runner: Callable[[Any], Any] | None = None) -> Any:
        """Run `params` (or `runner(pipeline)`, sized as `params`) on the slot's pipeline under the run lock."""
        cfg = slot.pipeline.uses_cfg(params)  # the pipeline's rule (LCM UNets: none; FLUX: true CFG only)
        adjuncts = _adjuncts(params)
        for _ in range(3):
            plan, warning = self._planner.for_request(slot.plan, params.width, params.height, params.num_images, cfg,
                                                      adjuncts)
            if warning:
                log.warning("%s", warning)
            with self._run_lock:
                check_current_job()  # cancelled while waiting for the lock: no adapters, no placement moves
                if self._slots.get(model) is slot:  # not evicted or replaced since it was looked up
                    self._planner.set_vae_options(slot.loaded.components, plan)
                    if loras or slot.loras is not None:  # first: under an offload plan a change places the model
                        self._apply_loras(slot, loras)     # anew (new swap groups), which the adjuncts then join
                    for note in self._planner.place_adjuncts(slot.loaded.components, plan, adjuncts):
                        log.info("%s: %s", model, note)
                    slot.compile_controlnets(params)
                    if slot.cfg_parallel is not None:  # its UNet copy is rebuilt when the adapters changed
                        slot.cfg_parallel.adapters_key = (slot.loras.active, slot.loras.fused) if slot.loras else None
                    if runner is not None:
                        return runner(slot.pipeline)
                    return run_compiled(slot.pipeline, params, step_callback)
            check_current_job()  # before reloading the evicted model (which may evict others)
            slot = self._slot(model)
        raise InsufficientMemoryError(f"{model} was evicted three times while waiting to run: too many models "
                                      "compete for the device budget")

    def _apply_loras(self, slot: _Slot, loras: list[Any]) -> None:
        manager = slot.lora_manager()
        if tuple((lo.sha256, lo.scale) for lo in loras) == manager.active:
            manager.apply(loras)  # the same set: nothing moves (fusing is off under offload plans)
            return
        with self._lora_change(slot):
            manager.apply(loras)

    @contextlib.contextmanager
    def _lora_change(self, slot: _Slot) -> Iterator[None]:
        """diffusers' LoRA loaders take accelerate hooks off and install their own model offload, and group offload
        keeps copies of the weights it was given: under an offloading plan the engine's placement comes off before
        adapters change and goes back on after, around the final modules."""
        if not getattr(slot.plan, "offloads", False):
            yield
            return
        from .runtime.placement import reset_placement

        reset_placement(slot.loaded.components, quiet=True)
        try:
            yield
        finally:
            self._planner.place(slot.loaded.components, slot.loaded.family, slot.plan)

    def _fall_back(self, model: str, failed_ref: "weakref.ref[_Slot]", failure: str) -> _Slot:
        """After an out-of-memory error: drop the failed placement and free its memory, then step one rung down
        the memory ladder (sized with that memory free) and reload the model with that plan; the next requests
        start from it too. `failed_ref` is weak: the caller keeps no reference to the failed slot."""
        failed = failed_ref()
        if failed is None:  # already dropped (evicted or replaced meanwhile): serve what is loaded now
            return self._slot(model)
        name, allow_pickle, single_file_config = failed.source
        config, plan = failed.config, failed.plan
        with self._load_lock:
            with self._run_lock:
                if self._slots.get(model) is failed:
                    del self._slots[model]
                    failed.drop()
            del failed
            self._release()
            smaller = self._planner.next_plan(plan)
            if smaller is None:
                raise InsufficientMemoryError(f"{model}: out of memory on {self.device} even with the smallest "
                                              f"memory plan ({self._planner.name(plan)}): {failure}")
            log.warning("%s: out of memory with plan %s; retrying once with %s", model, self._planner.name(plan),
                        self._planner.name(smaller))
        new = self._slot(name, allow_pickle, single_file_config, config, plan=smaller)
        new.report.memory_plan.append(f"fallback: out of memory with {self._planner.name(plan)} ({failure}); "
                                      f"stepped down to {self._planner.name(smaller)}")
        return new

    # -- upscale --------------------------------------------------------------------------------------------------
    def upscale(self, image: Any = None, *, request: UpscaleRequest | None = None, **kwargs: Any) -> UpscaleResult:
        """Upscale 4x with AuraSR. `image`: PIL image, numpy array, path, http(s) URL or data URI; RGBA keeps its
        alpha (resized classically), grayscale and palette images are converted."""
        from .images import load_image_input

        if request is None:
            request = parse_request(UpscaleRequest, {"image": image, **kwargs})
        pixels = load_image_input(request.image, max_pixels=self.max_input_pixels,
                                  allow_private_urls=self.allow_private_urls)
        slot = self._upscaler(request.model)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        with self._run_lock:
            check_current_job()  # cancelled while another request held the engine
            out, timings = slot.pipeline.upscale(pixels, overlapping_tiles=request.overlapping_tiles, seed=seed,
                                                 shared_style=request.shared_style)
        return UpscaleResult(image=out, seed=seed, timings=timings, model=request.model,
                             tiles=slot.pipeline.last_tile_count)

    def _upscaler(self, model: str) -> _UpscaleSlot:
        with self._load_lock:
            slot = self._upscalers.get(model)
            if slot is None:
                self._make_room(model, None)
                slot = _UpscaleSlot(model, self.device, self.compile_config, self.allow_pickle)
                self._upscalers[model] = slot
            self._last_used[model] = time.monotonic()
            return slot

    def _resolve(self, request: GenerateRequest, loaded: LoadedModel,
                 inputs: dict[str, Any] | None = None) -> GenerationParams:
        """Fill defaults from the model's spec and check what depends on the family. With an image (or a ControlNet
        image) the size follows it, rounded down to the family's multiple, unless width/height are given."""
        d = loaded.spec.defaults
        inputs = inputs or {}
        reference = inputs.get("image")
        if reference is None:
            reference = next(iter(inputs.get("controls", [])), None)
        m = loaded.family.size_multiple
        width = request.width if request.width is not None else (
            reference.width // m * m if reference is not None else d.width)
        height = request.height if request.height is not None else (
            reference.height // m * m if reference is not None else d.height)
        if reference is not None and (request.width is None or request.height is None):
            family = loaded.family
            if not (family.min_size <= width <= family.max_size and family.min_size <= height <= family.max_size):
                field = "image" if inputs.get("image") is not None else "controlnets[0].image"
                raise InvalidRequestError(field, f"a {reference.width}x{reference.height} image gives a {width}x"
                                          f"{height} output, out of range for {family.name}; pass width and height",
                                          f"{family.min_size}..{family.max_size} after rounding down to a multiple "
                                          f"of {m}", f"{reference.width}x{reference.height}")
        request.validate_for_family(loaded.family, width, height)
        max_seq = request.max_sequence_length or d.max_sequence_length
        if loaded.family.name == "flux":
            limit = loaded.components["tokenizer_2"].model_max_length
            max_seq = min(max_seq or 512, 512)
            if request.max_sequence_length is not None and request.max_sequence_length > limit:
                raise InvalidRequestError("max_sequence_length", f"{request.max_sequence_length} exceeds the T5 "
                                          f"tokenizer's limit", f"1..{limit}")
        scheduler = request.scheduler or d.scheduler
        if scheduler is not None:
            get_preset(scheduler, loaded.family.name)  # a clear error before the job is queued
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        return GenerationParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps or d.steps,
            guidance_scale=request.guidance_scale if request.guidance_scale is not None else d.guidance_scale,
            num_images=request.num_images,
            seed=seed,
            max_sequence_length=max_seq,
            true_cfg_scale=request.true_cfg_scale,
            scheduler=scheduler,
        )


    # -- image-conditioned inputs --------------------------------------------------------------------------------
    # Resolves a ControlNet id/folder/hub id: (source, *, family, torch_dtype, device) -> module. None: the loader in
    # engine.loading.controlnet. Injectable (tests, embedders with their own model store).
    controlnet_resolver: Any = None

    def _decode_images(self, request: GenerateRequest) -> dict[str, Any]:
        """Every image input decoded with the same checks as `upscale` (pixel cap, SSRF guard, local paths only for
        trusted callers); errors name the field."""
        from .images import load_image_input

        trusted = caller_policy().trusted

        def load(value: Any, field: str, mode: str) -> Any:
            image = load_image_input(value, max_pixels=self.max_input_pixels, field=field,
                                     allow_private_urls=self.allow_private_urls, allow_local_paths=trusted)
            return image.convert(mode)

        out: dict[str, Any] = {}
        if request.image is not None:
            out["image"] = load(request.image, "image", "RGB")
        if request.mask_image is not None:
            out["mask_image"] = load(request.mask_image, "mask_image", "L")
            if out.get("image") is not None and out["mask_image"].size != out["image"].size:
                raise InvalidRequestError("mask_image", f"is {out['mask_image'].size[0]}x{out['mask_image'].size[1]}"
                                          f", the image {out['image'].size[0]}x{out['image'].size[1]}: they must "
                                          "be the same size")
        out["controls"] = [load(c.image, f"controlnets[{i}].image", "RGB") for i, c in enumerate(request.controlnets)]
        if request.ip_adapter is not None:
            out["ip_adapter_image"] = load(request.ip_adapter.image, "ip_adapter.image", "RGB")
        return out

    def _conditioning(self, request: GenerateRequest, slot: _Slot, params: GenerationParams,
                      inputs: dict[str, Any]) -> GenerationParams:
        """Images at the output size, strength checked against the steps, ControlNets resolved and checked against
        the model; refuses what the compiled model cannot run (exported graphs) with the reason."""
        from PIL import Image

        from .pipelines.base import ControlInput

        size = (params.width, params.height)
        image, mask = inputs.get("image"), inputs.get("mask_image")
        if image is not None and image.size != size:  # as diffusers' VaeImageProcessor.resize (lanczos)
            image = image.resize(size, Image.Resampling.LANCZOS)
        if mask is not None and mask.size != size:
            mask = mask.resize(size, Image.Resampling.LANCZOS)
        denoiser = slot.loaded.family.denoiser
        if request.controlnets and denoiser in slot.exported:
            raise InvalidRequestError("controlnets", f"the {denoiser} of {request.model} runs as an exported "
                                      f"{slot.exported[denoiser]} graph, whose inputs are fixed at export: it cannot "
                                      "take ControlNet residuals; load it with backend='torch' to use ControlNets")
        controls = tuple(
            ControlInput(model=self._controlnet(c.model, i, slot), image=inputs["controls"][i],
                         conditioning_scale=c.conditioning_scale, start=c.start, end=c.end)
            for i, c in enumerate(request.controlnets))
        ip_adapter = self._ip_adapter(request, slot, inputs) if request.ip_adapter is not None else None
        params = dataclasses.replace(params, image=image, mask_image=mask, strength=request.strength,
                                     controls=controls, ip_adapter=ip_adapter)
        if "vae" in slot.exported and slot.pipeline.encodes_images(params):
            field = "image" if image is not None else "controlnets"
            raise InvalidRequestError(field, f"the VAE of {request.model} runs as an exported "
                                      f"{slot.exported['vae']} decoder graph, which cannot encode an image; load it "
                                      "with backend='torch' for this")
        slot.pipeline.spec(params)  # a mode diffusers has no class for fails here, naming the field
        if image is not None:
            strength = request.strength if request.strength is not None else slot.pipeline.default_strength(params)
            if slot.pipeline.denoising_steps(params.num_inference_steps, strength) < 1:
                raise InvalidRequestError("strength", f"{strength} of {params.num_inference_steps} steps leaves no "
                                          "denoising step; raise strength or num_inference_steps",
                                          "enough for one step of num_inference_steps", strength)
        return params

    def _ip_adapter(self, request: GenerateRequest, slot: _Slot, inputs: dict[str, Any]) -> Any:
        """The request's IP-Adapter resolved for this model: its state dict and CLIP image encoder (in the
        denoiser's compute dtype, on the device) cached per engine, so loading it into a job is cheap. The
        pipeline loads it for that job only (engine/pipelines/base.py)."""
        from .compiler.layout import is_fused, quantized_projection
        from .loading.ip_adapter import check_ip_adapter_fits, resolve_ip_adapter
        from .pipelines.base import IPAdapterInput, module_dtype

        spec = request.ip_adapter
        family, denoiser = slot.loaded.family.name, slot.loaded.family.denoiser
        if not slot.loaded.family.ip_adapter:  # FLUX IP-Adapters (XLabs layout): not yet
            takers = ", ".join(name for name, fam in FAMILIES.items() if fam.ip_adapter)
            raise InvalidRequestError("ip_adapter", f"IP-Adapters are supported for {takers} models, not yet for "
                                      f"{family}")
        if denoiser in slot.exported:
            raise InvalidRequestError("ip_adapter", f"the {denoiser} of {request.model} runs as an exported "
                                      f"{slot.exported[denoiser]} graph, whose attention is fixed at export: it "
                                      "cannot take IP-Adapter image tokens; load it with backend='torch' for this")
        unet = slot.loaded.components[denoiser]
        stored = quantized_projection(unet) if is_fused(unet) else None
        if stored:  # the pipeline splits fused q/k/v back for an IP-Adapter job: quantized storage does not split
            raise InvalidRequestError("ip_adapter", f"the {denoiser} of {request.model} has fused q/k/v projections "
                                      f"stored quantized ({stored}), which cannot be split back into the separate "
                                      "projections an IP-Adapter needs: load it with compile_config={'fuse_qkv': "
                                      "False} (or quant='none') for IP-Adapter requests")
        source = resolve_ip_adapter(spec.model, family=family)
        check_ip_adapter_fits(source, unet)
        dtype = module_dtype(unet)
        cache = self.__dict__.setdefault("_ip_adapters", {})
        key = (source.folder, source.subfolder, source.weight_name, source.image_encoder_folder, dtype)
        cached = cache.get(key)
        if cached is None:
            cached = cache[key] = _load_ip_adapter(source, dtype, self._planner.adjunct_home(slot.plan))
        state_dict, encoder = cached
        return IPAdapterInput(state_dict=state_dict, weight_name=source.weight_name, image_encoder=encoder,
                              image=inputs["ip_adapter_image"], scale=spec.scale)

    def _controlnet(self, model: Any, index: int, slot: _Slot) -> torch.nn.Module:
        """A ControlNet for this model: a module from a trusted caller, or loaded by id/path (cached per engine), in
        the denoiser's compute dtype; loaded onto the device under a resident memory plan, else onto the host (the
        plan places it per job: `Planner.place_adjuncts`)."""
        from .pipelines.base import module_dtype

        field = f"controlnets[{index}].model"
        family = slot.loaded.family.name
        dtype = module_dtype(slot.loaded.components[slot.loaded.family.denoiser])
        home = self._planner.adjunct_home(slot.plan)
        if isinstance(model, torch.nn.Module):
            if not caller_policy().trusted:
                raise InvalidRequestError(field, "a ControlNet module object is only accepted from trusted callers")
            module = model
        elif isinstance(model, str):
            from .compiler.compile import controlnet_compile_key

            cache = self.__dict__.setdefault("_controlnets", {})  # per compile key: compiling is in place
            key = (model, family, dtype, caller_policy().trusted,
                   controlnet_compile_key(getattr(slot.pipeline.run_context, "plan", None)))
            module = cache.get(key)
            if module is None:
                if self.controlnet_resolver is not None:
                    module = self.controlnet_resolver(model, family=family, torch_dtype=dtype, device=home)
                else:
                    from .loading.controlnet import load_controlnet

                    module = load_controlnet(model, family=family, torch_dtype=dtype, device=home, field=field)
                cache[key] = module
        else:
            raise InvalidRequestError(field, f"expected a ControlNet id, path or module, not {type(model).__name__}")
        from .loading.controlnet import check_controlnet_fits

        family_spec = slot.loaded.family
        check_controlnet_fits(module, slot.loaded.components[family_spec.denoiser], family_spec.name, field)
        return module if module_dtype(module) == dtype else module.to(dtype=dtype)

    def close(self) -> None:
        """Stop the engine's job queue (its threads; a running job ends `interrupted`) and unload every model.
        Idempotent; `with Engine(...) as engine:` calls it on exit. A `FalService`'s output files go with its own
        `close()`."""
        close_queue(self)
        for model in list(self.loaded_models()):
            self.unload(model)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Engine", "ModelNotFoundError"]
