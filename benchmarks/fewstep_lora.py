"""Few-step generation and LoRA hot-swap timings on this machine.

    python benchmarks/fewstep_lora.py --model small-sdxl --size 512

1. Time per image: the base schedule (25 steps, guidance 5, Euler) vs a Lightning/Turbo-style schedule
   (4 steps, no guidance, Euler with trailing spacing) on the same weights.
2. LoRA on a compiled model: swapping adapter A for B (hot-swap, no recompilation) vs what a swap cost without
   hot-swap (a fresh compiled engine loading B: recompilation), on the tiny SDXL model.
Writes benchmarks/results/fewstep_lora.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def few_steps(model: str, size: int, runs: int) -> dict:
    from engine import Engine

    eng = Engine(device="cpu", opt_level="O1")
    kw = dict(model=model, prompt="a lighthouse at dusk", width=size, height=size, seed=1)
    eng.generate(**kw, num_inference_steps=2)  # warm-up
    base = timed(lambda: eng.generate(**kw, num_inference_steps=25, guidance_scale=5.0, scheduler="euler"), runs)
    fast = timed(lambda: eng.generate(**kw, num_inference_steps=4, guidance_scale=0.0, scheduler="euler_trailing"),
                 runs)
    return {"model": model, "size": size, "base_25_steps_cfg_s": base, "lightning_4_steps_s": fast,
            "speedup": base / fast}


def lora_swap() -> dict:
    from engine import Engine
    from engine.compiler.compile import compile_counters
    from test_lora import make_lora

    with tempfile.TemporaryDirectory() as d:
        a, b = make_lora(Path(d) / "a.safetensors", 1), make_lora(Path(d) / "b.safetensors", 2, rank=8)
        kw = dict(model="tiny-sdxl", prompt="a cat", width=64, height=64, num_inference_steps=2, seed=1)
        eng = Engine(device="cpu", compile_config={"compile": True})
        start = time.perf_counter()
        eng.generate(**kw, loras=[{"path": str(a)}])
        first = time.perf_counter() - start
        graphs = compile_counters()["unique_graphs"]
        start = time.perf_counter()
        eng.generate(**kw, loras=[{"path": str(b)}])
        swap = time.perf_counter() - start
        steady = timed(lambda: eng.generate(**kw, loras=[{"path": str(b)}]), 2)
        recompiled = compile_counters()["unique_graphs"] - graphs
        fresh = Engine(device="cpu", compile_config={"compile": True, "compile_fullgraph": True})
        import torch

        torch._dynamo.reset()
        start = time.perf_counter()
        fresh.generate(**kw, loras=[{"path": str(b)}])
        recompile = time.perf_counter() - start
    return {"first_image_with_lora_a_s": first, "swap_to_b_first_image_s": swap, "steady_image_s": steady,
            "graphs_recompiled_by_swap": recompiled, "recompile_path_first_image_s": recompile}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small-sdxl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/fewstep_lora")
    args = parser.parse_args()
    steps = few_steps(args.model, args.size, args.runs)
    swap = lora_swap()
    command = "python " + " ".join(sys.argv)
    md = "\n".join([
        f"Command: `{command}` (CPU, O1)", "",
        f"| {steps['model']} {steps['size']}x{steps['size']} | seconds per image |", "|---|---|",
        f"| 25 steps, guidance 5 (CFG), Euler | {steps['base_25_steps_cfg_s']:.2f} |",
        f"| 4 steps, no guidance, Euler trailing (Lightning/Turbo) | {steps['lightning_4_steps_s']:.2f} |",
        f"| speed-up | {steps['speedup']:.1f}x |", "",
        "| LoRA on compiled tiny-sdxl (2 steps, 64x64) | seconds |", "|---|---|",
        f"| first image with LoRA A (compiles) | {swap['first_image_with_lora_a_s']:.2f} |",
        f"| swap to LoRA B (hot-swap) + image | {swap['swap_to_b_first_image_s']:.2f} "
        f"({swap['graphs_recompiled_by_swap']} graphs recompiled) |",
        f"| steady image with B | {swap['steady_image_s']:.2f} |",
        f"| without hot-swap: fresh compile with B + image | {swap['recompile_path_first_image_s']:.2f} |", ""])
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"command": command, "few_steps": steps, "lora": swap}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
