"""ONNX export of one component: declared inputs with dynamic axes inside shape profiles, graph checks, large models
as external data.

Exporter: PyTorch's TorchScript-based exporter (`dynamo=False`). It traces one call, which is fast (seconds for the
tiny models, where the dynamo exporter takes about a minute) and needs no extra package. Tracing freezes Python
control flow at the traced shapes, so each component is traced at shapes that take its general path (e.g. the UNet
at latent sizes that are not multiples of its upsampling factor, so the skip-connection sizes are forwarded, which
is also correct for multiples). Every axis a profile declares dynamic is dynamic in the graph; the profile bounds
(min/opt/max) are what TensorRT builds for and what the runtime wrappers accept.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6+ and onnxruntime 1.14+ run it
EXTERNAL_DATA_THRESHOLD = 2**31 - 1  # protobuf's limit: above it the weights go to one external file
EXTERNAL_DATA_FILE = "model.onnx.data"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class Dim:
    """One dynamic axis: its profile (min <= opt <= max) and the size it is traced at."""

    name: str
    min: int
    opt: int
    max: int
    trace: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        if not (self.min <= self.trace <= self.max):
            raise ValueError(f"dim {self.name}: trace size {self.trace} outside [{self.min}, {self.max}]")


Pick = Literal["min", "opt", "max", "trace"]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input: its axes (a Dim or a fixed size), its dtype ("model": the exported precision, "fp32": always
    float32, for timesteps and position ids the model casts itself), and how to fill a tracing example."""

    name: str
    dims: tuple[Dim | int, ...]
    dtype: Literal["model", "fp32"] = "model"
    fill: Literal["normal", "unit", "ids"] = "normal"

    def shape(self, pick: Pick) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else getattr(d, pick) for d in self.dims)

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype == "model" else torch.float32


@dataclass(frozen=True)
class ExportSpec:
    """What one exported component takes and returns, and how to call the torch module with named inputs."""

    component: str  # "unet", "transformer", "vae_decoder"
    inputs: tuple[TensorSpec, ...]
    output: str
    output_axes: dict[int, str]  # dynamic axes of the output, for the graph's declaration
    output_shape: Callable[[dict[str, torch.Tensor]], tuple[int, ...]]
    call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def dims(self) -> dict[str, Dim]:
        return {d.name: d for t in self.inputs for d in t.dims if isinstance(d, Dim)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {t.name: {i: d.name for i, d in enumerate(t.dims) if isinstance(d, Dim)} for t in self.inputs}
        return {**{k: v for k, v in axes.items() if v}, self.output: dict(self.output_axes)}

    def describe(self) -> dict[str, Any]:
        """Everything about the spec that changes the exported graph (part of its cache key)."""
        def dim(d: Dim | int) -> Any:
            return d if isinstance(d, int) else [d.name, d.min, d.opt, d.max, d.trace]

        return {"component": self.component, "output": self.output, "output_axes": self.output_axes,
                "inputs": [[t.name, [dim(d) for d in t.dims], t.dtype, t.fill] for t in self.inputs]}

    def example_inputs(self, dtype: torch.dtype, device: torch.device, pick: Pick = "trace",
                       seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = t.shape(pick)
            if t.fill == "ids":
                value = torch.randint(0, 64, shape, generator=generator).float()
            elif t.fill == "unit":
                value = torch.rand(shape, generator=generator)
            else:
                value = torch.randn(shape, generator=generator)
            out[t.name] = value.to(device=device, dtype=t.torch_dtype(dtype))
        return out

    def check(self, values: dict[str, torch.Tensor]) -> None:
        """Raise ValueError if `values` fall outside the profile (wrong rank, fixed size, or a dim out of bounds),
        or if one dim takes two sizes."""
        seen: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(values[t.name].shape)
            if len(shape) != len(t.dims):
                raise ValueError(f"{self.component}: input {t.name} has shape {shape}, expected rank {len(t.dims)}")
            for axis, (size, d) in enumerate(zip(shape, t.dims)):
                if isinstance(d, int):
                    if size != d:
                        raise ValueError(f"{self.component}: {t.name} axis {axis} is {size}, the export fixed {d}")
                    continue
                if not d.min <= size <= d.max:
                    raise ValueError(f"{self.component}: {t.name} axis {axis} ({d.name}) is {size}, outside the "
                                     f"exported profile [{d.min}, {d.max}]")
                if seen.setdefault(d.name, size) != size:
                    raise ValueError(f"{self.component}: {d.name} is {seen[d.name]} in one input and {size} in "
                                     f"{t.name}")


class _Adapter(torch.nn.Module):
    """Positional inputs in the spec's order (what the tracer needs) -> the component's own call signature."""

    def __init__(self, module: torch.nn.Module, spec: ExportSpec):
        super().__init__()
        self.module = module
        self.spec = spec

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.spec.call(self.module, dict(zip(self.spec.input_names, args)))


def _rms_norm_symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm (FLUX's q/k norms) for the TorchScript exporter, which has no symbolic for it: computed in
    float32 as torch does, cast back, then scaled by the weight."""
    from torch.onnx import symbolic_helper as sh

    _type_utils = sh._type_utils
    shape = sh._maybe_get_const(normalized_shape, "is")
    axes = list(range(-len(shape), 0))
    scalar = _type_utils.JitScalarType.from_value(x)
    epsilon = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    if epsilon is None:
        epsilon = torch.finfo(scalar.dtype()).eps
    xf = g.op("Cast", x, to_i=_type_utils.JitScalarType.FLOAT.onnx_type())
    mean_sq = g.op("ReduceMean", g.op("Mul", xf, xf), axes_i=axes, keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    out = g.op("Cast", g.op("Div", xf, denom), to_i=scalar.onnx_type())
    if not sh._is_none(weight):
        out = g.op("Mul", out, weight)
    out.setType(x.type())  # x's (symbolic) shape; without it the exporter assumes the traced sizes downstream
    return out


def _unflatten_symbolic(g: Any, x: Any, dim: Any, sizes: Any) -> Any:
    """aten::unflatten of the last axis (FLUX's `unflatten(-1, (-1, head_dim))`) as a Reshape to a constant shape
    with 0 ("keep this axis"). The stock symbolic computes the shape at run time, which hides the output's shape from
    the exporter; it then assumes the traced sizes and bakes them into every later reshape, so another resolution
    or prompt length would fail. Other axes use the stock symbolic."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset13

    rank = sh._get_tensor_rank(x)
    axis = sh._get_const(dim, "i", "dim")
    axis = axis + rank if rank is not None and axis < 0 else axis
    new = sh._maybe_get_const(sizes, "is")
    if rank is None or axis != rank - 1 or not isinstance(new, list):
        return symbolic_opset13.unflatten(g, x, dim, sizes)
    shape = torch.tensor([0] * axis + list(new), dtype=torch.int64)
    return g.op("Reshape", x, g.op("Constant", value_t=shape))


@contextlib.contextmanager
def _exporter() -> Iterator[None]:
    """Register the symbolics the exporter lacks or gets wrong for dynamic shapes; keep tracer warnings (expected:
    traced shapes) out of the log."""
    symbolics: dict[str, Callable[..., Any]] = {"aten::rms_norm": _rms_norm_symbolic,
                                                "aten::unflatten": _unflatten_symbolic}
    for name, fn in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx")
            yield
    finally:  # scoped to our exports: other torch.onnx.export calls in the process see the stock symbolics
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def export_onnx(module: torch.nn.Module, spec: ExportSpec, folder: Path, *, dtype: torch.dtype,
                device: torch.device, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, Any]:
    """Trace `module` through `spec` into folder/model.onnx (+ model.onnx.data when large) and check the graph."""
    path = folder / MODEL_FILE
    example = spec.example_inputs(dtype, device)
    adapter = _Adapter(module, spec).eval()
    with _exporter(), torch.no_grad():
        torch.onnx.export(adapter, tuple(example[n] for n in spec.input_names), str(path), dynamo=False,
                          opset_version=OPSET, input_names=spec.input_names, output_names=[spec.output],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    external = _consolidate(folder, path, external_data_threshold)
    check_onnx(path)
    return {"opset": OPSET, "external_data": external, "dtype": str(dtype).removeprefix("torch."),
            "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file())}


def _consolidate(folder: Path, path: Path, threshold: int) -> bool:
    """Weights above `threshold` bytes go to one external file beside the graph (the exporter, for >2 GB models,
    writes one file per tensor). Returns whether the model uses external data."""
    import onnx

    files = [p for p in folder.iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    if total <= threshold and files == [path]:
        return False
    model = onnx.load(str(path), load_external_data=True)
    for p in files:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
    return True


def check_onnx(path: Path) -> None:
    """onnx.checker with shape inference; given the path so models with external data are checked too."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def clamp_dim(name: str, lo: int, opt: int, hi: int, trace: int) -> Dim:
    """A Dim from possibly loose numbers: opt and trace are pulled inside [lo, hi]."""
    lo, hi = max(1, lo), max(1, lo, hi)
    return Dim(name, lo, min(max(opt, lo), hi), hi, min(max(trace, lo), hi))


__all__ = ["OPSET", "Dim", "ExportSpec", "TensorSpec", "check_onnx", "clamp_dim", "export_onnx"]
