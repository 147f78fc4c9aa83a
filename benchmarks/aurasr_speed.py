"""AuraSR speed on this machine: a 256x256 -> 1024x1024 upscale (16 tiles), ours vs the reference package.

Both run the same seeded random weights of a reduced config (the real structure at `--dim` width; the full model is
dim 64). Rows:
- reference fp32: `aura_sr.AuraSR.upscale_4x` (per-tile styles, batch 8);
- ours fp32 / bf16 / bf16 channels-last, per-tile styles: the reference's semantics, with its noise;
- ours bf16, shared style: styles precomputed once per call, static channels-last convolutions;
- ours bf16, shared style + regional torch.compile (with --compile).
Quality: PSNR against the fp32 run with the same semantics (per-tile rows against the reference, shared-style rows
against ours fp32 shared style).

    python benchmarks/aurasr_speed.py [--dim 16] [--repeats 3] [--threads N] [--compile]

Prints a markdown table and writes benchmarks/results/aurasr_speed_cpu.json. The reference imports torchvision,
which does not install beside a CPU-only torch; its three torchvision names are stubbed here.
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.loading.aurasr import calibrate_output  # noqa: E402
from engine.models.aurasr import AuraSRConfig, AuraSRGenerator, parameter_count  # noqa: E402
from engine.pipelines.aurasr import AuraSRPipeline  # noqa: E402

SIDE = 256  # input side: 16 tiles of 64x64
CPU = torch.device("cpu")
CAPTURED: dict[str, torch.Tensor] = {}


def reduced_config(dim: int) -> dict[str, Any]:
    return {"style_network": {"dim_in": 128, "dim_out": 8 * dim, "depth": 4}, "dim": dim, "image_size": 256,
            "input_image_size": 64, "unconditional": True, "skip_connect_scale": 0.4,
            "self_attn_heads": max(1, dim // 8), "self_attn_dim_head": 8 if dim < 64 else 64}


def import_reference() -> types.ModuleType:
    class ToTensor:
        def __call__(self, image: Any) -> torch.Tensor:
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)

    class ToPILImage:
        def __call__(self, tensor: torch.Tensor) -> Any:
            from PIL import Image

            CAPTURED["float"] = tensor.clone()
            return Image.fromarray(tensor.mul(255).byte().permute(1, 2, 0).numpy())

    stub = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms", "torchvision.utils")}
    for name, module in stub.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    stub["torchvision.transforms"].ToTensor = ToTensor
    stub["torchvision.transforms"].ToPILImage = ToPILImage
    stub["torchvision.utils"].save_image = lambda *a, **k: None
    stub["torchvision"].transforms, stub["torchvision"].utils = stub["torchvision.transforms"], stub["torchvision.utils"]
    import einops  # noqa: F401  (imported outside the patch so it stays importable)

    with mock.patch.dict(sys.modules, stub):
        import aura_sr
    return aura_sr


def interleaved(variants: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, tuple[list[float], Any]]:
    """Warm every variant up, then time them round-robin: on a shared machine a burst of load then hits every
    variant once instead of all repeats of one (best-of is reported)."""
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up: allocations, oneDNN primitives, compiles
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], outputs[name]) for name in variants}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a regional torch.compile row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "aurasr_speed_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = reduced_config(args.dim)
    generator = torch.Generator().manual_seed(0)
    base = AuraSRGenerator(AuraSRConfig.from_dict(config))
    base.reset_parameters(generator)
    calibrate_output(base, generator)
    state = base.state_dict()
    pixels = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    image_u8 = (pixels * 255).round().byte()
    pixels = image_u8.float() / 255  # what both sides see after the uint8 round trip
    from PIL import Image

    image = Image.fromarray(image_u8.permute(1, 2, 0).numpy())

    aura_sr = import_reference()
    reference = aura_sr.AuraSR(copy.deepcopy(config), device="cpu")
    reference.upsampler.load_state_dict(state)
    reference.upsampler.eval()

    def ours(dtype: torch.dtype, channels_last: bool = False) -> AuraSRPipeline:
        model = AuraSRGenerator(AuraSRConfig.from_dict(config))
        model.load_state_dict(state)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return AuraSRPipeline(model, CPU, dtype, max_batch_tiles=8)

    def run_reference() -> torch.Tensor:
        torch.manual_seed(7)
        reference.upscale_4x(image)
        return CAPTURED["float"]

    def run(pipe: AuraSRPipeline, shared: bool) -> Callable[[], torch.Tensor]:
        return lambda: pipe.upscale_tensor(pixels, generator=torch.Generator().manual_seed(7), shared_style=shared)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "reference fp32 (per-tile styles)": run_reference,
        "ours fp32 (per-tile styles)": run(ours(torch.float32), False),
        "ours bf16 (per-tile styles)": run(ours(torch.bfloat16), False),
        "ours bf16 channels-last (per-tile styles)": run(ours(torch.bfloat16, True), False),
        "ours fp32 shared style": run(ours(torch.float32), True),
        "ours bf16 shared style, channels-last": run(ours(torch.bfloat16, True), True),
    }
    against = {name: ("ours fp32 shared style" if "shared" in name else "reference fp32 (per-tile styles)")
               for name in variants}
    with torch.inference_mode():
        if args.compile:
            pipe = ours(torch.bfloat16, True)
            start = time.perf_counter()
            count = pipe.model.compile_repeated_blocks(dynamic=False)
            run(pipe, True)()
            seconds = time.perf_counter() - start
            name = f"ours bf16 shared style, channels-last, regional compile ({count} blocks, {seconds:.0f} s compile)"
            variants[name], against[name] = run(pipe, True), "ours fp32 shared style"
        results = interleaved(variants, args.repeats)
    rows: list[dict[str, Any]] = []
    for name, (times, out) in results.items():
        reference_out = results[against[name]][1]
        best = min(times)
        rows.append({"variant": name, "seconds_best": best, "seconds_median": statistics.median(times),
                     "tiles_per_s": 16 / best,
                     "psnr_db": None if against[name] == name else psnr(out, reference_out)})

    ref_best = rows[0]["seconds_best"]
    print(f"\nAuraSR {SIDE}x{SIDE} -> {SIDE * 4}x{SIDE * 4} (16 tiles), reduced config dim={args.dim} "
          f"({parameter_count(base) / 1e6:.1f}M params), {torch.get_num_threads()} threads, "
          f"best of {args.repeats}\n")
    print("| variant | seconds | tiles/s | speed-up vs reference | PSNR (dB) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        quality = "-" if row["psnr_db"] is None else ("inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.1f}")
        print(f"| {row['variant']} | {row['seconds_best']:.3f} | {row['tiles_per_s']:.2f} | "
              f"{ref_best / row['seconds_best']:.2f}x | {quality} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "aurasr_speed", "input": [SIDE, SIDE], "output": [SIDE * 4, SIDE * 4], "tiles": 16,
        "config": config, "params": parameter_count(base), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(), "command": " ".join(sys.argv),
        "rows": [{**r, "psnr_db": None if r["psnr_db"] is None or math.isinf(r["psnr_db"]) else r["psnr_db"]}
                 for r in rows],
    }
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
