"""What every diffusion pipeline of the engine shares: the request parameters, stage timers, step callbacks, and the
composition of diffusers' pipeline classes over the engine's components.

The engine does not re-derive diffusers' pipelines. Per job it builds a lightweight diffusers pipeline object (the
class for the family and mode, `engine.pipelines.modes`) over the same, already optimized and placed components,
with a fresh scheduler, and runs it in three timed stages:

- encode: the pipeline's own `encode_prompt`, through the prompt cache and the memory plan's `encode_scope`;
- denoise: the pipeline's `__call__` with those embeddings and `output_type="latent"`; `callback_on_step_end`
  feeds the engine's step callback (progress, previews, cancel by raising);
- decode: unscale (and for FLUX unpack) the latents, `vae.decode`, `VaeImageProcessor.postprocess`, as diffusers.

So the numerics are stock diffusers' by construction, for every mode (text-to-image, image-to-image, inpainting,
ControlNet), and the compiler's work (dtype, attention, fused QKV, compile, step caches, export) is the components'.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from ..errors import InvalidRequestError
from .modes import ModeSpec, mode_spec

log = logging.getLogger(__name__)

# Called after each denoising step with (step index, number of steps, current latents); may raise to stop the job.
StepCallback = Callable[[int, int, torch.Tensor], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than its text encoder's limit and was cut, as diffusers does."""


@dataclass(frozen=True)
class ControlInput:
    """One resolved ControlNet of a job: the module (in the denoiser's dtype, on its device) and its image."""

    model: torch.nn.Module
    image: Image.Image
    conditioning_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class IPAdapterInput:
    """A resolved IP-Adapter of a job: its state dict as diffusers' `load_ip_adapter` reads it ({"image_proj": ...,
    "ip_adapter": ...}, cached by the engine), its CLIP image encoder (denoiser dtype, on the device), the image."""

    state_dict: dict[str, dict[str, torch.Tensor]]
    weight_name: str
    image_encoder: torch.nn.Module
    image: Image.Image
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationParams:
    """One validated job, in the pipeline's terms (the API resolves defaults and decodes images before this).

    `image` alone is image-to-image, with `mask_image` inpainting; `controls` add ControlNets to either mode."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    seed: int
    max_sequence_length: int | None = None
    true_cfg_scale: float = 1.0
    scheduler: str | None = None  # preset name; None keeps the model's own scheduler
    lora_key: tuple[Any, ...] = ()  # the active adapters (hash, scale): part of the prompt cache key
    image: Image.Image | None = None  # already at width x height
    mask_image: Image.Image | None = None  # already at width x height
    strength: float | None = None  # None: the diffusers class's default
    controls: tuple[ControlInput, ...] = ()
    ip_adapter: IPAdapterInput | None = None

    @property
    def mode(self) -> str:
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "text2img"


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    timings: dict[str, float]


class StageTimer:
    """Wall time per stage; on CUDA the device is synchronised at each boundary so the times are real."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def seeded_generator(seed: int) -> torch.Generator:
    """The CPU generator diffusers users pass (`torch.Generator("cpu").manual_seed(seed)`): same seed, same noise."""
    return torch.Generator("cpu").manual_seed(seed)


def fresh_scheduler(scheduler: Any, preset: str | None = None, family: str = "") -> Any:
    """A new scheduler per call (the model's, or a named preset built from its config), so per-call state (step
    index, sigmas) never leaks between jobs."""
    if preset is not None:
        from ..schedulers import build_scheduler

        return build_scheduler(preset, family, scheduler.config)
    return type(scheduler).from_config(scheduler.config)


def warn_if_truncated(tokenizer: Any, prompt: str, max_length: int, what: str) -> None:
    """diffusers cuts over-long prompts and logs it; the engine also raises a `PromptTruncatedWarning` so library
    callers can catch it."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1] or (full.shape[-1] == ids.shape[-1] and not torch.equal(full, ids)):
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        message = f"prompt truncated to {max_length} tokens for {what}; removed: {removed}"
        log.warning(message)
        warnings.warn(message, PromptTruncatedWarning, stacklevel=4)


# Dtypes weights may be stored in but never computed in (fp8 layerwise-casting storage upcasts per layer).
STORAGE_ONLY_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a component computes in: its first floating parameter's, skipping storage-only dtypes (fp8
    storage keeps norms and embeddings in the compute dtype; quantized tensors report their original dtype)."""
    first = None
    for p in module.parameters():
        if p.is_floating_point():
            if p.dtype not in STORAGE_ONLY_DTYPES:
                return p.dtype
            first = first or p.dtype
    return first or torch.float32


# `__call__` keywords that come from a request field, for the error when a class lacks one.
_REQUEST_FIELD = {"true_cfg_scale": "true_cfg_scale", "negative_prompt_embeds": "negative_prompt",
                  "negative_pooled_prompt_embeds": "negative_prompt", "ip_adapter_image": "ip_adapter"}


class _ComputeDtypeView:
    """A text encoder whose `.dtype` answers its compute dtype. transformers models with fp8 storage (layerwise
    casting) report fp8, and diffusers' `encode_prompt` casts the embeddings to the encoder's `.dtype`; diffusers'
    own models already answer the compute dtype (`get_parameter_dtype` reads the casting hook)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.__dict__.update(_module=module, dtype=dtype)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)


def _compute_dtype_views(components: dict[str, Any]) -> dict[str, Any]:
    out = dict(components)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module) and getattr(module, "dtype", None) in STORAGE_ONLY_DTYPES:
            out[name] = _ComputeDtypeView(module, module_dtype(module))
    return out


@functools.cache
def _on_device(cls: type) -> type:
    """The diffusers class with `_execution_device` answering the engine's device: the memory plans place
    components themselves (hooks, group offload), so the pipeline need not infer the device from them."""
    return type(cls.__name__, (cls,), {"_execution_device": property(lambda self: self._engine_device),
                                        "__module__": cls.__module__, "__doc__": cls.__doc__})


def build_diffusers_pipeline(cls: type, components: dict[str, Any], config: dict[str, Any],
                             device: torch.device) -> Any:
    """`cls(**components)` over components we hold (no copy): absent optional ones (safety checker, feature
    extractor, image encoder) are None; pipeline-level settings come from the model folder's model_index.json."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    kwargs.update({k: v for k, v in config.items() if k in params and k not in kwargs})
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False  # the engine ships no safety checker (fal's note says so)
    for name, p in params.items():
        if name == "self" or name in kwargs or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            kwargs[name] = None
    pipe = _on_device(cls)(**kwargs)
    pipe._engine_device = device
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_parameters(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__call__).parameters)


class TextToImagePipeline:
    """Base of the family pipelines (every mode, not only text-to-image): holds the components and runs the three
    stages of a diffusers pipeline of the job's mode, with timings. Families say how to encode a prompt through
    `encode_prompt` and how to turn the final latents into images."""

    family = ""
    denoiser_name = ""

    def __init__(self, components: dict[str, Any], device: torch.device, config: dict[str, Any] | None = None):
        self.components = components
        self.device = device
        self.config = dict(config or {})  # pipeline-level settings from model_index.json
        self.prompt_cache: Any = None  # set by the compiler's prompt cache pass
        self.run_context: Callable[[], Any] | None = None  # set by the compile pass: scope of compiled calls
        # Set by the memory plan: scope around text encoding (e.g. encoders brought onto the device, then sent back)
        self.encode_scope: Callable[[], Any] | None = None
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]

    # -- modes --------------------------------------------------------------------------------------------------
    def spec(self, params: GenerationParams) -> ModeSpec:
        return mode_spec(self.family, params.mode, bool(params.controls), self.denoiser_variant())

    def denoiser_variant(self) -> str:
        """"inpaint" for denoisers that take the masked image as extra input channels (9-channel UNets, FLUX Fill)."""
        return ""

    def encodes_images(self, params: GenerationParams) -> bool:
        """Whether the job runs the VAE encoder (an exported VAE has only its decoder)."""
        return params.image is not None

    def denoising_steps(self, steps: int, strength: float) -> int:
        """The steps an image-conditioned job runs (diffusers' `get_timesteps` for SD and SDXL); zero is an error
        diffusers would raise mid-job."""
        return min(int(steps * strength), steps)

    def default_strength(self, params: GenerationParams) -> float:
        """The diffusers class's own default strength for this mode."""
        return float(call_parameters(self.spec(params).resolve())["strength"].default)

    def build(self, params: GenerationParams, scheduler: Any | None = None) -> Any:
        spec = self.spec(params)
        components = dict(self.components)
        if scheduler is not None:
            components["scheduler"] = scheduler
        if params.controls:
            models = [c.model for c in params.controls]
            components["controlnet"] = models[0] if len(models) == 1 else models
        if params.ip_adapter is not None:
            from transformers import CLIPImageProcessor

            encoder = params.ip_adapter.image_encoder
            components["image_encoder"] = encoder
            if components.get("feature_extractor") is None:  # as `load_ip_adapter` makes one
                size = encoder.config.image_size
                components["feature_extractor"] = CLIPImageProcessor(size=size, crop_size=size)
        return build_diffusers_pipeline(spec.resolve(), _compute_dtype_views(components), self.config, self.device)

    # -- run ----------------------------------------------------------------------------------------------------
    def __call__(self, params: GenerationParams, step_callback: StepCallback | None = None) -> PipelineOutput:
        timer = StageTimer(self.device)
        generator = seeded_generator(params.seed)
        start = time.perf_counter()
        scope = self.run_context() if self.run_context is not None else contextlib.nullcontext()
        # no_grad, as diffusers' pipelines: offload hooks move weights inside the call, and moving tensor-subclass
        # weights (torchao, layerwise casting) swaps tensors, which inference mode forbids.
        with torch.no_grad(), scope:
            pipe = self.build(params, fresh_scheduler(self.scheduler, params.scheduler, self.family))
            with timer.stage("encode"):
                cond = self._encode_cached(pipe, params)
            with timer.stage("denoise"), self._ip_adapter_loaded(pipe, params.ip_adapter):
                try:
                    latents = self.denoise(pipe, params, cond, generator, step_callback)
                finally:
                    self._reset_step_cache()
            with timer.stage("decode"):
                images = self.decode(pipe, params, latents)
        timer.timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, timings=timer.timings)

    @contextlib.contextmanager
    def _ip_adapter_loaded(self, pipe: Any, adapter: IPAdapterInput | None) -> Iterator[None]:
        """diffusers' `load_ip_adapter` for this job only: it swaps the shared denoiser's attention processors and
        sets its `encoder_hid_proj` (after which every call would need image embeddings), so both are put back
        exactly as they were (the compiler's processors included, which `unload_ip_adapter` would rebuild bare)."""
        if adapter is None:
            yield
            return
        from ..compiler.layout import fuse_qkv, is_fused, unfuse_qkv

        denoiser = self.denoiser()
        processors = dict(denoiser.attn_processors)
        hid_proj, hid_type = denoiser.encoder_hid_proj, denoiser.config.encoder_hid_dim_type
        # The IP-Adapter processors project with to_k/to_v: split fused q/k/v back for the job (exact), fuse after.
        refuse = is_fused(denoiser) and unfuse_qkv(denoiser) > 0
        unfused = dict(denoiser.attn_processors)
        try:
            state = {part: dict(tensors) for part, tensors in adapter.state_dict.items()}  # diffusers pops from it
            pipe.load_ip_adapter(state, subfolder="", weight_name=adapter.weight_name, image_encoder_folder=None)
            pipe.set_ip_adapter_scale(adapter.scale)
            yield
        finally:
            denoiser.set_attn_processor(unfused)
            denoiser.encoder_hid_proj = hid_proj
            denoiser.config.encoder_hid_dim_type = hid_type
            if refuse:
                fuse_qkv(denoiser)
            denoiser.set_attn_processor(processors)

    def uses_cfg(self, params: GenerationParams) -> bool:
        """Whether the job runs a negative branch (the memory planner sizes activations by it)."""
        raise NotImplementedError

    def encode(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        """The `__call__` keywords that carry the prompt (prompt_embeds, ...), for one image per prompt."""
        raise NotImplementedError

    def prompt_key(self, params: GenerationParams) -> tuple[Any, ...]:
        """Everything `encode` reads from the request."""
        return (params.prompt, params.negative_prompt, self.uses_cfg(params), params.max_sequence_length,
                params.lora_key)

    def _encode(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        scope = self.encode_scope() if self.encode_scope is not None else contextlib.nullcontext()
        with scope:
            return self.encode(pipe, params)

    def _encode_cached(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        if self.prompt_cache is None:
            return self._encode(pipe, params)
        key = self.prompt_key(params)
        cond = self.prompt_cache.get(key)
        if cond is None:
            cond = self._encode(pipe, params)
            self.prompt_cache.put(key, cond)
        return cond

    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    def _reset_step_cache(self) -> None:
        """Step caches (diffusers cache hooks) hold the previous step's residuals: clear them between jobs."""
        reset = getattr(self.denoiser(), "_reset_stateful_cache", None)
        if reset is not None and getattr(self.denoiser(), "is_cache_enabled", False):
            reset()

    def batched(self, cond: dict[str, Any], num_images: int) -> tuple[dict[str, Any], int]:
        """The cached one-image embeddings and the `num_images_per_prompt` to pass with them: SD and SDXL repeat
        given embeddings per image themselves."""
        return cond, num_images

    def call_kwargs(self, pipe: Any, params: GenerationParams) -> dict[str, Any]:
        """Family-specific `__call__` keywords (guidance, sizes)."""
        return {"guidance_scale": params.guidance_scale, "height": params.height, "width": params.width}

    def denoise(self, pipe: Any, params: GenerationParams, cond: dict[str, Any], generator: torch.Generator,
                step_callback: StepCallback | None) -> torch.Tensor:
        spec = self.spec(params)
        accepted = call_parameters(type(pipe))
        family_kwargs = self.call_kwargs(pipe, params)
        for size in ("height", "width"):  # classes without them follow the image, which is already at this size
            if size not in accepted:
                family_kwargs.pop(size, None)
        cond, per_prompt = self.batched(cond, params.num_images)
        kwargs: dict[str, Any] = {**{k: v for k, v in cond.items() if v is not None}, **family_kwargs,
                                  "num_inference_steps": params.num_inference_steps,
                                  "num_images_per_prompt": per_prompt, "generator": generator,
                                  "output_type": "latent", "return_dict": False}
        if params.image is not None:
            kwargs["image"] = params.image
            kwargs["strength"] = params.strength if params.strength is not None else self.default_strength(params)
        if params.mask_image is not None:
            kwargs["mask_image"] = params.mask_image
        if params.ip_adapter is not None:
            kwargs["ip_adapter_image"] = params.ip_adapter.image
        if params.controls:
            images = [c.image for c in params.controls]
            one = len(params.controls) == 1
            kwargs[spec.control_image_arg] = images[0] if one else images
            for arg, values in (("controlnet_conditioning_scale", [c.conditioning_scale for c in params.controls]),
                                ("control_guidance_start", [c.start for c in params.controls]),
                                ("control_guidance_end", [c.end for c in params.controls])):
                kwargs[arg] = values[0] if one else values
        if step_callback is not None:
            def on_step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                step_callback(i, p.num_timesteps, tensors["latents"])
                return {}

            kwargs["callback_on_step_end"] = on_step_end
        unknown = sorted(k for k in kwargs if k not in accepted)
        for name in unknown:  # never drop an input silently
            field = _REQUEST_FIELD.get(name)
            if field is None:  # a table entry out of step with diffusers
                raise TypeError(f"{type(pipe).__name__} takes no {name}")
            raise InvalidRequestError(field, f"diffusers' {type(pipe).__name__} (this model's {params.mode}"
                                      f"{' with ControlNet' if params.controls else ''}) does not take it")
        return pipe(**kwargs)[0]

    def decode(self, pipe: Any, params: GenerationParams, latents: torch.Tensor) -> list[Image.Image]:
        latents = self.unscale_latents(pipe, params, latents).to(device=self.device, dtype=module_dtype(self.vae))
        decoded = self.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def unscale_latents(self, pipe: Any, params: GenerationParams, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
