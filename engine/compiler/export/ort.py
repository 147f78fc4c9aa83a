"""onnxruntime sessions: the best execution provider the device and the installed build offer, run through IO binding
so inputs and the output stay where torch keeps them (no host round trip on CUDA, no copy on the CPU).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .onnx_export import ExportSpec
from .tensorrt import profile_shapes

# Preferred first. The TensorRT EP builds its own engines (cached on disk); the CUDA EP runs cuDNN/cuBLAS kernels.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
_NUMPY = {torch.float32: "float32", torch.float16: "float16"}


def installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def unavailable_reason(device: torch.device, available: list[str] | None = None) -> str | None:
    """Why onnxruntime cannot run the graphs on `device`, or None. On CUDA it needs a GPU provider: the CPU-only
    build would be handed CUDA tensors (the plain `onnxruntime` wheel; `onnxruntime-gpu` has the CUDA provider)."""
    if not installed():
        return "package not installed (pip install 'engine[onnx]')"
    if device.type != "cuda":
        return None
    available = available_providers() if available is None else available
    if not any(p in available for p in GPU_PROVIDERS):
        return (f"this onnxruntime build has no GPU provider ({', '.join(available)}); pip install onnxruntime-gpu "
                "for CUDA")
    return None


def provider_order(device: torch.device, available: list[str]) -> list[str]:
    """Providers to ask for, best first: GPU providers only for a CUDA device, the CPU provider always last."""
    wanted = [p for p in GPU_PROVIDERS if p in available] if device.type == "cuda" else []
    return [*wanted, CPU_PROVIDER]


# The graph's precision per (provider kind, model dtype). The CPU provider has fp32 kernels only (its fp16 coverage is
# partial). GPU providers run fp16; bf16 has no numpy type for IO binding and partial kernel coverage in the CUDA
# provider, so a bf16 model runs as fp16 there (the precision TensorRT's and onnxruntime's diffusion demos use),
# unless the component overflows in fp16 (see FP16_UNSAFE), which then runs fp32.
GRAPH_DTYPES: dict[tuple[str, torch.dtype], torch.dtype] = {
    ("cpu", torch.float32): torch.float32, ("cpu", torch.float16): torch.float32,
    ("cpu", torch.bfloat16): torch.float32,
    ("gpu", torch.float32): torch.float32, ("gpu", torch.float16): torch.float16,
    ("gpu", torch.bfloat16): torch.float16,
}


def provider_kind(provider: str) -> str:
    return "cpu" if provider == CPU_PROVIDER else "gpu"


def fp16_safe(component: str, config: Any) -> bool:
    """Whether a component may run in fp16: the rule the dtype pass applies (VAEs flagged `force_upcast`, SDXL's and
    FLUX's, overflow to inf/NaN in fp16; denoisers run fp16, FLUX's blocks clip to the fp16 range themselves)."""
    return not (component == "vae" and bool(getattr(config, "force_upcast", False)))


def graph_dtype(provider: str, dtype: torch.dtype, *, fp16_ok: bool = True) -> tuple[torch.dtype, str]:
    """The precision to export for `provider`, and a note when it differs from the model's."""
    kind = provider_kind(provider)
    chosen = GRAPH_DTYPES.get((kind, dtype), torch.float32)
    if chosen == torch.float16 and dtype != torch.float16 and not fp16_ok:
        return torch.float32, f"{_name(dtype)} -> fp32 (overflows in fp16: force_upcast)"
    if chosen == dtype:
        return dtype, ""
    why = "CPU provider kernels" if kind == "cpu" else "onnxruntime GPU providers: fp16 kernels, no bf16 IO binding"
    return chosen, f"{_name(dtype)} -> {_name(chosen)} ({why})"


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _shapes(spec: ExportSpec, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile_shapes(spec).items())


def provider_options(provider: str, device: torch.device, spec: ExportSpec, dtype: torch.dtype,
                     cache: Path) -> dict[str, Any]:
    """Options per provider: the TensorRT EP gets the spec's profile (pass a narrowed spec, see profiles.py), fp16
    when the graph is fp16, and engine and timing caches under the artifact store."""
    index = device.index if device.index is not None else 0
    if provider == "TensorrtExecutionProvider":
        return {"device_id": index, "trt_fp16_enable": dtype == torch.float16,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache / "engines"),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache / "timing"),
                "trt_profile_min_shapes": _shapes(spec, 0), "trt_profile_opt_shapes": _shapes(spec, 1),
                "trt_profile_max_shapes": _shapes(spec, 2)}
    if provider == "CUDAExecutionProvider":
        return {"device_id": index}
    return {}


class OrtRunner:
    """One onnxruntime session over an exported graph, called with torch tensors through IO binding."""

    def __init__(self, model: Path, providers: list[tuple[str, dict[str, Any]]], device: torch.device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()  # share the CPU as torch is told to
        options.log_severity_level = 3
        for _, opts in providers:
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if key in opts:
                    Path(opts[key]).mkdir(parents=True, exist_ok=True)
        self.session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
        self.device = device
        self.provider = self.session.get_providers()[0]
        self.description = f"onnxruntime {self.provider}"
        self._output = self.session.get_outputs()[0].name

    def _bind(self, bind: Any, name: str, tensor: torch.Tensor, output: bool) -> None:
        kind = "cuda" if tensor.device.type == "cuda" else "cpu"
        index = tensor.device.index or 0
        dtype = np.dtype(_NUMPY[tensor.dtype])
        args = (name, kind, index, dtype, list(tensor.shape), tensor.data_ptr())
        (bind.bind_output if output else bind.bind_input)(*args)

    def __call__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        bind = self.session.io_binding()
        for name, tensor in inputs.items():
            self._bind(bind, name, tensor, output=False)
        self._bind(bind, self._output, output, output=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are ready
        self.session.run_with_iobinding(bind)
        bind.synchronize_outputs()
