"""backend pass: run the denoiser (UNet / FLUX transformer) and the VAE decoder on onnxruntime or TensorRT.

Each component is exported to ONNX (cached on disk, see export/store.py), loaded into an onnxruntime session or a
TensorRT engine, and replaced in the components by a stand-in module with the original's call signature, so the
pipelines do not know the difference. Text encoders stay in torch.

Runs after the dtype / fuse / attention passes (it exports what they produced) and before compile: replaced
components are recorded in `ctx.state["backend"]` for the compile pass to leave alone. A requested TensorRT that
cannot run here falls back to onnxruntime, then to torch; every fallback and every component left on torch is in
the report with its reason (an engine without an execution context, i.e. out of device memory, included).

On CUDA the torch copy of a component goes to the host before its export (traced there) and stays there while the
engines build, so TensorRT's builder and the engines get the device memory; it is dropped once a backend runs the
component, and put back on the device if none could.

Engines are built for narrow shape profiles (export/profiles.py: TensorRT static image sizes, up to 4 images, a new
engine built on the first request at another size, at most 3 kept per component); the exported ONNX stays dynamic
over the family's range. onnxruntime on a GPU runs fp16 graphs (bf16 models included, except VAEs that overflow in
fp16), on the CPU fp32; the graph's precision is part of its artifact key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .artifacts import artifact_key, device_tag, weights_identity
from .context import PassContext
from .export import ort, store, tensorrt
from .export.modules import ExportedFluxTransformer, ExportedModule, ExportedUNet, ExportedVaeDecoder, Runner
from .export.onnx_export import MODEL_FILE, OPSET, ExportSpec, export_onnx
from .export.profiles import POLICIES, Bucket, BucketedRunner, BucketPlan, narrow
from .export.specs import SizeProfile, UnsupportedComponent, denoiser_spec, vae_decoder_spec

log = logging.getLogger(__name__)

NAME = "backend"
CHAINS = {"tensorrt": ("tensorrt", "onnxruntime"), "onnxruntime": ("onnxruntime",)}
WRAPPERS: dict[str, type[ExportedModule]] = {"unet": ExportedUNet, "transformer": ExportedFluxTransformer,
                                             "vae": ExportedVaeDecoder}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


@dataclass(frozen=True)
class Target:
    """One component to move off torch."""

    name: str  # key in ctx.components
    module: torch.nn.Module
    spec: ExportSpec  # the exported graph's: the family's whole range
    denoiser: bool
    profile: SizeProfile
    spec_for: Callable[[SizeProfile], ExportSpec]  # the spec over another size profile (narrow buckets)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def rows_per_image(self) -> int:
        """Batch rows per image: two for a denoiser that runs the negative branch in the same batch."""
        return 2 if self.denoiser and self.profile.cfg else 1

    def plan(self, runtime: str) -> BucketPlan:
        return BucketPlan.create(POLICIES[runtime], self.spec, self.rows_per_image, self.profile, self.spec_for)


def apply_backend(ctx: PassContext) -> None:
    """Replace the denoiser and VAE decoder by exported stand-ins on the best usable backend of the request."""
    requested = ctx.config.backend
    if requested == "torch":
        ctx.report.skipped(NAME, "torch requested: the denoiser and VAE decoder run in PyTorch")
        return
    chain = _usable_chain(ctx, requested)
    if not chain:
        ctx.report.skipped(NAME, "no exported backend can run here: the denoiser and VAE decoder stay on torch")
        return
    replaced: dict[str, str] = ctx.state.setdefault("backend", {})
    for target in _targets(ctx):
        backend = _replace(ctx, target, chain)
        if backend is not None:
            replaced[target.name] = backend


def _usable_chain(ctx: PassContext, requested: str) -> list[str]:
    """The backends to try, best first; each one that cannot run here is reported with its reason."""
    chain = []
    candidates = CHAINS[requested]
    for i, name in enumerate(candidates):
        why = _unavailable(name, ctx.device)
        if why is None:
            chain.append(name)
            continue
        rest = [n for n in candidates[i + 1:] if _unavailable(n, ctx.device) is None]
        ctx.report.skipped(NAME, f"{name}: {why}; " + (f"falling back to {rest[0]}" if rest else "staying on torch"))
    return chain


def _unavailable(name: str, device: torch.device) -> str | None:
    if name == "tensorrt":
        why = tensorrt.unavailable_reason(device)
    else:
        why = ort.unavailable_reason(device)
    if why is None and importlib.util.find_spec("onnx") is None:  # both backends start from the ONNX export
        why = "package onnx not installed (pip install 'engine[onnx]')"
    return why


def _targets(ctx: PassContext) -> list[Target]:
    """The denoiser (unless something blocks its export, which is reported) and the VAE decoder."""
    profile = SizeProfile.for_family(ctx.family, ctx.components["vae"])
    vae = ctx.components["vae"]
    targets = [Target("vae", vae, vae_decoder_spec(vae, profile), denoiser=False, profile=profile,
                      spec_for=lambda p: vae_decoder_spec(vae, p))]
    denoiser = _denoiser_target(ctx, profile)
    return targets if denoiser is None else [denoiser, *targets]


def _denoiser_target(ctx: PassContext, profile: SizeProfile) -> Target | None:
    name = ctx.family.denoiser
    module = ctx.components[name]
    blocker = _denoiser_blocker(ctx, module)
    if blocker is None:
        try:
            return Target(name, module, denoiser_spec(name, module, ctx.components, profile), denoiser=True,
                          profile=profile, spec_for=lambda p: denoiser_spec(name, module, ctx.components, p))
        except UnsupportedComponent as e:
            blocker = f"{e} has no export spec"
    ctx.report.skipped(NAME, f"{name}: {blocker}; stays on torch")
    return None


def _denoiser_blocker(ctx: PassContext, module: torch.nn.Module) -> str | None:
    if ctx.state.get("quant"):
        return f"weights are torchao-quantized ({ctx.state['quant']}), which the ONNX exporter cannot trace"
    if getattr(module, "is_cache_enabled", False):
        return f"the {ctx.config.cache} step cache runs Python hooks between blocks, which an exported graph cannot"
    return None


Build = Callable[[PassContext, Target], tuple[Runner, torch.dtype, str]]


def _replace(ctx: PassContext, target: Target, chain: list[str]) -> str | None:
    """Swap in the first backend of the chain that builds; report each failure. Returns the backend used.

    The torch copy waits on the host meanwhile (see `host_device`); it is put back where it was if no backend
    builds, and otherwise left to be dropped with the last reference to it (the components now hold the stand-in).
    """
    home = target.device
    host = host_device(home)
    if host is not None:
        target.module.to(host)
        torch.cuda.empty_cache()  # the allocator's cached blocks back to the driver, for TensorRT and onnxruntime
    try:
        for backend in chain:
            try:
                runner, dtype, detail = BUILDERS[backend](ctx, target)
            except Exception as e:  # export, build or context failure: reported, then the next backend (or torch)
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("%s: %s failed", target.name, backend, exc_info=True)
                ctx.report.skipped(NAME, f"{target.name}: {backend} failed ({type(e).__name__}: {message[:300]})")
                continue
            ctx.components[target.name] = WRAPPERS[target.name](runner, target.spec, target.module, dtype, ctx.device)
            moved = f"; torch copy moved to the {host.type} for export and build, then dropped" if host else ""
            ctx.report.applied(NAME, f"{target.name}: {detail}{moved}")
            return backend
    except BaseException:
        if host is not None:
            target.module.to(home)
        raise
    if host is not None:
        target.module.to(home)
    ctx.report.skipped(NAME, f"{target.name}: no backend of {', '.join(chain)} built; stays on torch")
    return None


def host_device(device: torch.device) -> torch.device | None:
    """Where a component waits while it is exported and its engines are built: the host, when it lives on an
    accelerator; None (stays put) when it already is on the host."""
    return None if device.type == "cpu" else torch.device("cpu")


# -- ONNX artifacts --------------------------------------------------------------------------------------------


def _weights(module: torch.nn.Module) -> str:
    source = getattr(module.config, "_name_or_path", "") or ""
    return json.dumps([weights_identity(source) if source else "", store.weights_fingerprint(module)])


def _config(module: torch.nn.Module) -> dict[str, Any]:
    config: Any = module.config
    return dict(config)


def onnx_key(ctx: PassContext, target: Target, dtype: torch.dtype) -> str:
    """Everything the exported graph depends on: weights, the precision it is exported in, the spec (profiles),
    the class and its config, the opset and the exporter's libraries."""
    import onnx

    config_hash = hashlib.sha256(json.dumps({"dtype": str(dtype), "fuse_qkv": ctx.config.fuse_qkv}).encode())
    key = artifact_key(weights=_weights(target.module), config_hash=config_hash.hexdigest()[:16],
                       shapes=target.spec.describe(), device=ctx.device,
                       extra={"class": type(target.module).__name__, "config": _config(target.module),
                              "opset": OPSET, "onnx": onnx.__version__, "exporter": "torchscript",
                              "format": store.FORMAT})
    return f"onnx-{target.name}-{key}"


def onnx_artifact(ctx: PassContext, target: Target, dtype: torch.dtype) -> tuple[store.Artifact, str]:
    key = onnx_key(ctx, target, dtype)

    def build(folder: Any) -> dict[str, Any]:
        start = time.perf_counter()
        with _export_view(target.module, dtype):  # traced where the module is: the host, see _replace
            meta = export_onnx(target.module, target.spec, folder, dtype=dtype, device=target.device)
        return {**meta, "export_s": round(time.perf_counter() - start, 2)}

    return store.get_or_build(key, build), key


@contextlib.contextmanager
def _export_view(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The module as the exporter must see it, restored afterwards (a failed export leaves torch's copy as it was):
    in the graph's dtype, and with diffusers' dispatcher on native SDPA (flash/sage kernels do not trace)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    original = next(module.parameters()).dtype
    processors: list[Any] = [m.processor for m in module.modules()
                  if hasattr(getattr(m, "processor", None), "_attention_backend")]
    saved = [p._attention_backend for p in processors]
    try:
        for p in processors:
            p._attention_backend = AttentionBackendName.NATIVE
        if dtype != original:
            module.to(dtype)
        yield
    finally:
        for p, backend in zip(processors, saved):
            p._attention_backend = backend
        if dtype != original:
            module.to(original)


def _origin(artifact: store.Artifact) -> str:
    how = "reused from cache" if artifact.reused else f"exported in {artifact.meta.get('export_s', '?')} s"
    return f"{artifact.path.name} {how}"


# -- backends -------------------------------------------------------------------------------------------------


def _build_onnxruntime(ctx: PassContext, target: Target) -> tuple[Runner, torch.dtype, str]:
    import onnxruntime

    providers = ort.provider_order(ctx.device, onnxruntime.get_available_providers())
    dtype, note = ort.graph_dtype(providers[0], target.dtype,
                                  fp16_ok=ort.fp16_safe(target.name, target.module.config))
    artifact, key = onnx_artifact(ctx, target, dtype)
    bucket = ""
    options = []
    for p in providers:
        spec = target.spec
        if p == "TensorrtExecutionProvider":  # one narrow dynamic profile; the EP builds and caches its engines
            chosen = target.plan("onnxruntime-tensorrt").initial()
            spec, bucket = narrow(target.spec, chosen), f"TensorRT provider profile {chosen.describe()}"
        options.append((p, ort.provider_options(p, ctx.device, spec, dtype, store.store_root() / "ort-trt" / key)))
    runner = ort.OrtRunner(artifact.file(MODEL_FILE), options, ctx.device)
    notes = "; ".join(n for n in (note, bucket, _origin(artifact)) if n)
    return runner, dtype, f"{runner.description} {DTYPE_NAMES.get(dtype, dtype)}, io binding ({notes})"


def _build_tensorrt(ctx: PassContext, target: Target) -> tuple[Runner, torch.dtype, str]:
    """A bucketed runner over narrow engines; the engine of the family's native size is built now (so a failure
    falls back at load, not in a request), others on the first request that needs them."""
    convolutions = any(isinstance(m, CONVOLUTIONS) for m in target.module.modules())
    half, cast = tensorrt.graph_precision(tensorrt.precision_for(target.dtype, "none"), convolutions=convolutions,
                                          fp16_ok=ort.fp16_safe(target.name, target.module.config))
    precision = tensorrt.precision_for(target.dtype, ctx.config.quant if target.denoiser else "none")
    precision = precision if precision == "fp8" else half
    plan = tensorrt.precision_plan(precision, half=half)
    onnx_art, okey = onnx_artifact(ctx, target, plan.export_dtype)
    version, tag = tensorrt.version(), device_tag(ctx.device)
    timing = store.store_root() / "timing-cache" / tensorrt.timing_cache_name(version, tag)
    origins: list[str] = []

    def build(bucket: Bucket) -> Runner:
        spec = narrow(target.spec, bucket)
        key = tensorrt.engine_key(onnx_key=okey, spec=spec, precision=precision, trt_version=version,
                                  device_tag=tag)
        engine = store.get_or_build(key, lambda folder: tensorrt.build_engine(
            onnx_art.file(MODEL_FILE), spec, plan, folder, timing, ctx.device))
        origins.append(f"{engine.path.name} {'reused from cache' if engine.reused else 'built'}")
        log.info("%s: TensorRT engine for %s: %s", target.name, bucket.describe(), origins[-1])
        return tensorrt.TrtRunner(engine.file(tensorrt.ENGINE_FILE), ctx.device)

    buckets = target.plan("tensorrt")
    runner = BucketedRunner(buckets, target.spec, build, release=lambda: torch.cuda.empty_cache())
    first = buckets.initial()
    engine = runner.prepare(first)
    policy = buckets.policy
    later = ("other sizes build an engine on first use" if policy.on_miss == "build"
             else "other sizes are refused (422)")
    profile = (f"{policy.shapes} profile {first.describe()}; {later}, at most {policy.max_engines} kept")
    notes = "; ".join(n for n in (cast, plan.note, profile, origins[0], _origin(onnx_art)) if n)
    return runner, plan.export_dtype, f"{engine.description} {DTYPE_NAMES[plan.export_dtype]} ({notes})"


BUILDERS: dict[str, Build] = {"onnxruntime": _build_onnxruntime, "tensorrt": _build_tensorrt}
