"""What every text-to-image pipeline shares: the request parameters, stage timers, seeded noise, step callbacks.

Each family's pipeline is three stages (encode the prompt, denoise, decode the latents) with the same numerics as the
stock diffusers pipeline, so that the engine's lossless presets reproduce it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from PIL import Image

log = logging.getLogger(__name__)

# Called after each denoising step with (step index, number of steps, current latents); may raise to stop the job.
StepCallback = Callable[[int, int, torch.Tensor], None]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than its text encoder's limit and was cut, as diffusers does."""


@dataclass(frozen=True)
class GenerationParams:
    """One validated text-to-image job, in the pipeline's terms (the API resolves defaults before this)."""

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


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Draw on the CPU generator and move, as diffusers' `randn_tensor` does for a CPU generator."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def fresh_scheduler(scheduler: Any, preset: str | None = None, family: str = "") -> Any:
    """A new scheduler per call (the model's, or a named preset built from its config), so per-call state (step
    index, sigmas) never leaks between jobs."""
    if preset is not None:
        from ..schedulers import build_scheduler

        return build_scheduler(preset, family, scheduler.config)
    return type(scheduler).from_config(scheduler.config)


def extra_step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """`eta` for DDIM-like schedulers, the job's generator for stochastic ones (as diffusers passes them)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
    """Pad/truncate to `max_length` tokens, warning (as diffusers does) when a prompt was cut."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1] or (full.shape[-1] == ids.shape[-1] and not torch.equal(full, ids)):
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        message = f"prompt truncated to {max_length} tokens for {what}; removed: {removed}"
        log.warning(message)
        warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
    return ids


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


class TextToImagePipeline:
    """Base of the family pipelines: holds the components and runs the three stages with timings."""

    family = ""

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
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def __call__(self, params: GenerationParams, step_callback: StepCallback | None = None) -> PipelineOutput:
        timer = StageTimer(self.device)
        generator = seeded_generator(params.seed)
        start = time.perf_counter()
        scope = self.run_context() if self.run_context is not None else contextlib.nullcontext()
        # no_grad, as diffusers' pipelines: offload hooks move weights inside the call, and moving tensor-subclass
        # weights (torchao, layerwise casting) swaps tensors, which inference mode forbids.
        with torch.no_grad(), scope:
            with timer.stage("encode"):
                cond = self._encode_cached(params)
            with timer.stage("denoise"):
                try:
                    latents = self.denoise(params, cond, generator, step_callback)
                finally:
                    self._reset_step_cache()
            with timer.stage("decode"):
                images = self.decode(params, latents)
        timer.timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, timings=timer.timings)

    def encode(self, params: GenerationParams) -> dict[str, Any]:
        raise NotImplementedError

    def prompt_key(self, params: GenerationParams) -> tuple[Any, ...]:
        """Everything `encode` reads from the request."""
        return (params.prompt, params.negative_prompt, params.num_images, params.guidance_scale > 1.0,
                params.max_sequence_length, params.true_cfg_scale > 1.0, params.lora_key)

    def _encode(self, params: GenerationParams) -> dict[str, Any]:
        scope = self.encode_scope() if self.encode_scope is not None else contextlib.nullcontext()
        with scope:
            return self.encode(params)

    def _encode_cached(self, params: GenerationParams) -> dict[str, Any]:
        if self.prompt_cache is None:
            return self._encode(params)
        key = self.prompt_key(params)
        cond = self.prompt_cache.get(key)
        if cond is None:
            cond = self._encode(params)
            self.prompt_cache.put(key, cond)
        return cond

    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def _reset_step_cache(self) -> None:
        """Step caches (diffusers cache hooks) hold the previous step's residuals: clear them between jobs."""
        reset = getattr(self.denoiser(), "_reset_stateful_cache", None)
        if reset is not None and getattr(self.denoiser(), "is_cache_enabled", False):
            reset()

    def denoise(self, params: GenerationParams, cond: dict[str, Any], generator: torch.Generator,
                step_callback: StepCallback | None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, params: GenerationParams, latents: torch.Tensor) -> list[Image.Image]:
        raise NotImplementedError

    def _to_pil(self, decoded: torch.Tensor) -> list[Image.Image]:
        """[-1, 1] images to uint8 PIL, rounding as diffusers' VaeImageProcessor does."""
        images = (decoded / 2 + 0.5).clamp(0, 1)
        arrays = (images.cpu().permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arrays]
