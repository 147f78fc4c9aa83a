"""TensorRT engines built from the exported ONNX with the `tensorrt` Python API (optional extra `[tensorrt]`).

Precision lives in the graph: the ONNX is exported in the compute dtype (fp16 / bf16 / fp32) and the network is
built strongly typed. Weakly typed builder flags (FP16, BF16) are deprecated since TensorRT 10.12 and removed in
11, so none are set. FP8 in TensorRT needs explicit quantization (Q/DQ nodes, e.g. from NVIDIA ModelOpt), which this
exporter does not produce; an fp8 request builds at the half-precision dtype and the report says so.

Each engine is built for one narrow profile (a bucket, see profiles.py: static image size by default, up to 4
images), never for the family's whole range: TensorRT sizes an execution context's memory for the profile maximum.
The torch copy of the component is on the host while the builder runs (backend.py), so the builder has the device.

The pure parts (profile shapes, precision plan, cache keys, availability) are importable without tensorrt and
unit-tested on any machine; building and running are thin calls into tensorrt, on CUDA only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .onnx_export import ExportSpec
from .profiles import DeviceMemoryError, NoExecutionContext

Shape = tuple[int, ...]
ENGINE_FILE = "engine.plan"
WORKSPACE_FRACTION = 0.5  # of free device memory the builder may use for tactics


def profile_shapes(spec: ExportSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input: the one optimization profile an engine is built for."""
    return {t.name: (t.shape("min"), t.shape("opt"), t.shape("max")) for t in spec.inputs}


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build for a precision: the dtype the ONNX is exported in, network creation flags, builder flags."""

    precision: str
    export_dtype: torch.dtype
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    note: str = ""


_EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_plan(precision: str, half: str = "fp16") -> PrecisionPlan:
    """The build plan for `precision` ("fp32", "fp16", "bf16", "fp8"); `half` is the dtype fp8 falls back to."""
    if precision == "fp8":
        base = precision_plan(half)
        return PrecisionPlan("fp8", base.export_dtype, base.network_flags, base.builder_flags,
                             f"fp8 needs explicit Q/DQ quantization (e.g. NVIDIA ModelOpt), which this exporter does "
                             f"not produce; building {half}")
    if precision not in _EXPORT_DTYPES:
        raise ValueError(f"unknown TensorRT precision {precision!r}; known: fp32, fp16, bf16, fp8")
    return PrecisionPlan(precision, _EXPORT_DTYPES[precision], ("STRONGLY_TYPED",), ())


def graph_precision(precision: str, *, convolutions: bool, fp16_ok: bool) -> tuple[str, str]:
    """The precision the exported graph can carry, and a note when it is not `precision`. A bf16 graph with
    convolutions fails ONNX's checker (Conv takes bf16 only from opset 22; the exporter writes opset 17), so UNets and
    VAEs build fp16, as NVIDIA's diffusion demo does, or fp32 where fp16 overflows; FLUX's transformer (no
    convolution) stays bf16."""
    if precision != "bf16" or not convolutions:
        return precision, ""
    why = "ONNX Conv takes no bf16 before opset 22"
    if fp16_ok:
        return "fp16", f"bf16 -> fp16 ({why})"
    return "fp32", f"bf16 -> fp32 ({why}; overflows in fp16: force_upcast)"


def precision_for(dtype: torch.dtype, quant: str) -> str:
    """The precision a config asks for: fp8 when quant says so, else the compute dtype the dtype pass chose."""
    if quant == "fp8":
        return "fp8"
    return {v: k for k, v in _EXPORT_DTYPES.items()}.get(dtype, "fp32")


def engine_key(*, onnx_key: str, spec: ExportSpec, precision: str, trt_version: str, device_tag: str) -> str:
    """Cache key of an engine: the graph it was built from, its profile, precision, TensorRT version and GPU (an
    engine is only valid for the TensorRT build and GPU model that made it)."""
    payload = {"onnx": onnx_key, "profile": {k: list(map(list, v)) for k, v in profile_shapes(spec).items()},
               "precision": precision, "plan": _plan_repr(precision), "tensorrt": trt_version, "device": device_tag}
    return "trt-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _plan_repr(precision: str) -> list[Any]:
    plan = precision_plan(precision)
    return [str(plan.export_dtype), list(plan.network_flags), list(plan.builder_flags)]


def timing_cache_name(trt_version: str, device_tag: str) -> str:
    """One timing cache per (TensorRT version, GPU): layer timings are only valid there, and every engine built on
    that pair reuses and extends it."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{trt_version}-{device_tag}")
    return f"timing-{safe}.cache"


def unavailable_reason(device: torch.device) -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"no CUDA device (device is {device.type})"
    if importlib.util.find_spec("tensorrt") is None:
        return "package not installed (pip install 'engine[tensorrt]')"
    return None


def version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


# -- GPU-only: build and run -------------------------------------------------------------------------------------


def _logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, spec: ExportSpec, plan: PrecisionPlan, out: Path, timing_cache: Path,
                 device: torch.device) -> dict[str, Any]:
    """Parse the ONNX (external data is found beside it), build one profile, keep the timing cache."""
    import tensorrt as trt

    logger = _logger()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        flags = 0
        for name in plan.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        for name in plan.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        free, _ = torch.cuda.mem_get_info(device)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(free * WORKSPACE_FRACTION))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(spec).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT build failed (see the TensorRT log above)")
        (out / ENGINE_FILE).write_bytes(bytes(serialized))
        _save_timing_cache(bytes(config.get_timing_cache().serialize()), timing_cache)
    return {"precision": plan.precision, "tensorrt": trt.__version__}


def _save_timing_cache(data: bytes, path: Path) -> None:
    """Atomic replace: concurrent builders each write a complete cache; the last one wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def device_memory(engine: Any) -> int | None:
    """Bytes an execution context of `engine` needs (for its profile maximum), where this TensorRT says."""
    for name in ("device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, name, None)
        if isinstance(value, int):
            return value
    return None


def context_failure(name: str, needed: int | None, free: int) -> str:
    need = "an unknown amount of" if needed is None else f"{needed / 2**20:.0f} MiB of"
    return (f"TensorRT could not create an execution context for {name}: it needs {need} device memory for its "
            f"profile maximum, {free / 2**20:.0f} MiB are free")


class TrtRunner:
    """A deserialized engine run on torch's current CUDA stream, reading and writing torch tensors in place."""

    def __init__(self, engine_path: Path, device: torch.device):
        import tensorrt as trt

        self.device = device
        self.runtime = trt.Runtime(_logger())
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:  # out of device memory for the weights, or an engine of another TensorRT / GPU
            raise DeviceMemoryError(f"TensorRT could not load {engine_path.parent.name} "
                                    f"({torch.cuda.mem_get_info(device)[0] / 2**20:.0f} MiB free)")
        context = self.engine.create_execution_context()
        if context is None:  # TensorRT logs the cause and returns None, typically out of device memory
            raise NoExecutionContext(context_failure(engine_path.parent.name, device_memory(self.engine),
                                                     torch.cuda.mem_get_info(device)[0]))
        self.context = context
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.description = f"tensorrt {trt.__version__}"

    def __call__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(self.output, output.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
