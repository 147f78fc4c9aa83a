"""Kernel benchmark: each engine kernel (engine/kernels) against its PyTorch reference run eagerly and against what
inductor generates for the same reference graph (torch.compile, static shapes), on the shapes of the real models.

    python benchmarks/kernel_speed.py --out benchmarks/results/kernels_cuda.json

Shapes: SDXL at 1024x1024 with classifier-free guidance (UNet GroupNorm+SiLU at 128/64/32 latent pixels, NCHW and
channels-last; the VAE decoder's widest maps) and FLUX at 1024x1024 (4096 image + 512 text tokens, 3072 wide, 24
heads of 128: adaLN on the image stream and the joint stream, q/k RMSNorm+RoPE). Each figure is the median of
timed runs after warm-up; "gbps" counts the bytes the fused op must move (inputs read once, output written once).

GPU figures only: on any other device `run_kernel_benchmarks` returns {"skipped": reason} (benchmarks/gpu_smoke.py
embeds its result). `--device cpu --quick` under TRITON_INTERPRET=1 runs the same code on small shapes to check the
script, with timings that mean nothing (marked "interpreted").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Shape:
    name: str  # model, where, layout
    kernel: str
    make: Callable[[torch.device, torch.dtype, bool], tuple[Any, ...]]  # (device, dtype, quick) -> op arguments


def _gn(n: int, c: int, hw: int, channels_last: bool) -> Callable[..., tuple[Any, ...]]:
    def make(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[Any, ...]:
        side = max(4, hw // 32) if quick else hw
        x = torch.randn(n, c, side, side, device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(c, device=device, dtype=dtype)
        return x, w, torch.randn_like(w), 32, 1e-5, True
    return make


def _ln(tokens: int, dim: int = 3072) -> Callable[..., tuple[Any, ...]]:
    def make(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[Any, ...]:
        t, d = (max(8, tokens // 64), dim // 16) if quick else (tokens, dim)
        x = torch.randn(1, t, d, device=device, dtype=dtype)
        emb = torch.randn(1, 6 * d, device=device, dtype=dtype)  # the modulation projection, chunked
        shift, scale = emb.chunk(6, dim=1)[:2]
        return x, scale, shift, None, None, 1e-6
    return make


def _rr(tokens: int, heads: int = 24, dim: int = 128) -> Callable[..., tuple[Any, ...]]:
    def make(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[Any, ...]:
        t, h = (max(8, tokens // 64), 2) if quick else (tokens, heads)
        qkv = torch.randn(1, t, 3 * h * dim, device=device, dtype=dtype)  # q as the fused projection's first third
        q = qkv[..., : h * dim].unflatten(-1, (h, dim))
        angles = torch.rand(t, dim // 2, device=device) * 6.28
        cos, sin = (f(angles).repeat_interleave(2, dim=1) for f in (torch.cos, torch.sin))
        return q, torch.randn(dim, device=device, dtype=dtype), cos, sin, 1e-6
    return make


SHAPES: list[Shape] = [
    Shape("sdxl unet 320ch 128x128 NCHW", "group_norm_silu", _gn(2, 320, 128, False)),
    Shape("sdxl unet 320ch 128x128 channels-last", "group_norm_silu", _gn(2, 320, 128, True)),
    Shape("sdxl unet 640ch 64x64 channels-last", "group_norm_silu", _gn(2, 640, 64, True)),
    Shape("sdxl unet 1280ch 32x32 channels-last", "group_norm_silu", _gn(2, 1280, 32, True)),
    Shape("sdxl vae 512ch 256x256 NCHW", "group_norm_silu", _gn(1, 512, 256, False)),
    Shape("sdxl vae 128ch 1024x1024 NCHW", "group_norm_silu", _gn(1, 128, 1024, False)),
    Shape("flux adaLN image stream 4096x3072", "layer_norm_modulate", _ln(4096)),
    Shape("flux adaLN single blocks 4608x3072", "layer_norm_modulate", _ln(4608)),
    Shape("flux q RMSNorm+RoPE 4608 tokens x 24x128", "rms_norm_rope", _rr(4608)),
]


def _references() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """kernel name -> (custom op, reference), from engine.kernels.KERNELS."""
    import importlib

    from engine.kernels import KERNELS

    modules = {name: importlib.import_module(f"engine.kernels.{name}") for name in KERNELS}
    return {name: (getattr(modules[name], name), getattr(modules[name], spec.reference))
            for name, spec in KERNELS.items()}


def _time_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bytes(args: tuple[Any, ...], out: torch.Tensor) -> int:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) + out.numel() * out.element_size()


def skip_reason(device: torch.device, allow_interpreter: bool = False) -> str | None:
    from engine.kernels import interpreting, unavailable_reason

    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if allow_interpreter and interpreting():
        return unavailable_reason(device)
    return f"kernel figures are GPU-only (device is {device.type})"


def run_kernel_benchmarks(device: torch.device | str = "cuda", *, dtype: torch.dtype = torch.bfloat16,
                          quick: bool = False, iters: int = 50, budget_s: float = 300.0,
                          allow_interpreter: bool = False, shapes: list[Shape] | None = None) -> dict[str, Any]:
    """Per shape: eager reference, inductor (compiled reference) and kernel times in ms, speed-ups, the kernel's
    effective bandwidth and its largest difference from the reference. Shapes not started within `budget_s` are
    listed as skipped."""
    device = torch.device(device)
    why = skip_reason(device, allow_interpreter)
    if why is not None:
        return {"skipped": why}
    ops = _references()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for shape in shapes or SHAPES:
        row: dict[str, Any] = {"shape": shape.name, "kernel": shape.kernel}
        rows.append(row)
        if time.perf_counter() - started > budget_s:
            row["skipped"] = f"time budget of {budget_s:.0f} s spent"
            continue
        try:
            op, reference = ops[shape.kernel]
            args = shape.make(device, dtype, quick)
            with torch.no_grad():
                compiled = torch.compile(reference, fullgraph=True, dynamic=False)
                want = reference(*args)
                got = op(*args)
                row["max_abs_diff"] = float((got.float() - want.float()).abs().max())
                row["eager_ms"] = _time_ms(lambda: reference(*args), device, iters)
                row["inductor_ms"] = _time_ms(lambda: compiled(*args), device, iters)
                row["kernel_ms"] = _time_ms(lambda: op(*args), device, iters)
            row["vs_eager"] = round(row["eager_ms"] / row["kernel_ms"], 3)
            row["vs_inductor"] = round(row["inductor_ms"] / row["kernel_ms"], 3)
            row["kernel_gbps"] = round(_bytes(args, got) / row["kernel_ms"] / 1e6, 1)
        except Exception as e:  # noqa: BLE001 - a failing shape is a result, the others still run
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        finally:
            torch._dynamo.reset()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)",
            "dtype": str(dtype).removeprefix("torch."), "quick": quick, "iters": iters,
            "elapsed_s": round(time.perf_counter() - started, 1), "shapes": rows}


def table(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"kernels: skipped ({result['skipped']})"
    lines = [f"{'shape':44} {'eager ms':>9} {'inductor':>9} {'kernel':>9} {'x eager':>8} {'x induct':>8} {'GB/s':>7}"]
    for r in result["shapes"]:
        if "kernel_ms" not in r:
            lines.append(f"{r['shape']:44} {r.get('error') or r.get('skipped')}")
            continue
        lines.append(f"{r['shape']:44} {r['eager_ms']:9.3f} {r['inductor_ms']:9.3f} {r['kernel_ms']:9.3f} "
                     f"{r['vs_eager']:8.2f} {r['vs_inductor']:8.2f} {r['kernel_gbps']:7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="small shapes (with --device cpu: the interpreter)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/kernels_cuda.json")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    result = run_kernel_benchmarks(args.device, dtype=dtype, quick=args.quick, iters=args.iters,
                                   allow_interpreter=args.quick)
    print(table(result))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if "skipped" in result or not any("error" in r for r in result["shapes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
