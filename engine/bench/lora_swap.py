"""LoRA hot-swap on a compiled model, in the harness's terms (`benchmarks/lora_swap.py` is its entry point).

Per round, on one engine compiled once (regional torch.compile, its LoRA slot filled by adapter A):
- "swap + image": the next request names the other adapter (A <-> B), so the slot's weights are swapped in place;
- "same LoRA, image": the next request names the same adapter again (the image alone);
- after those rounds, "fresh compile + image": what a change of adapter costs without hot-swap, a new engine that
  compiles with the adapter (`torch._dynamo.reset()` first, so nothing is reused from the first engine).
Swap and same-LoRA runs alternate, so load from other work falls on both; the graphs compiled during the swaps are
counted (0: no recompilation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .measurement import Measurements

SWAP = "swap to the other LoRA + image (hot-swap)"
SAME = "same LoRA again, image"
FRESH = "no hot-swap: fresh compile with the other LoRA + image"


def measure_lora_swap(m: Measurements, *, model: str = "tiny-sdxl", size: int = 64, steps: int = 2,
                      fresh_runs: int | None = None) -> None:
    import torch

    from ..api import Engine
    from ..compiler.compile import compile_counters
    from ..testing import random_lora

    fresh_runs = m.runs if fresh_runs is None else fresh_runs
    with tempfile.TemporaryDirectory() as d:
        loras = [str(random_lora(model, Path(d) / "a.safetensors", seed=1)),
                 str(random_lora(model, Path(d) / "b.safetensors", seed=2, rank=8))]
        job: dict[str, Any] = dict(model=model, prompt="a cat", width=size, height=size, num_inference_steps=steps,
                                   seed=1)
        engine = Engine(device=m.device, compile_config={"compile": True})
        try:
            m.time("first image with LoRA A (compiles)", lambda: engine.generate(**job, loras=[{"path": loras[0]}]))
            graphs = compile_counters()["unique_graphs"]
            current = 0
            for _ in range(m.runs):
                current = 1 - current
                path = loras[current]
                m.time(SWAP, lambda: engine.generate(**job, loras=[{"path": path}]))
                m.time(SAME, lambda: engine.generate(**job, loras=[{"path": path}]))
            recompiled = compile_counters()["unique_graphs"] - graphs
        finally:
            engine.unload(model)
        # After the swaps (a dynamo reset drops every compiled graph, the first engine's too).
        for i in range(fresh_runs):
            path = loras[i % 2]
            torch._dynamo.reset()
            fresh = Engine(device=m.device, compile_config={"compile": True})
            try:
                m.time(FRESH, lambda: fresh.generate(**job, loras=[{"path": path}]))
            finally:
                fresh.unload(model)
    m.get(SWAP).extra["graphs compiled during the swaps"] = recompiled
    m.notes.append(f"{model} {size}x{size}, {steps} steps, Engine(compile_config={{'compile': True}}) (regional "
                   "torch.compile, LoRA hot-swap slot); adapters: random rank 4 (A) and rank 8 (B)")
    m.notes.append("the fresh compiles reuse inductor's on-disk cache (ENGINE_CACHE_DIR) as a restarted process "
                   "would: dynamo traces again, compiled kernels are cache hits; the first image pays whatever "
                   "that cache did not hold yet")
    m.ratio("fresh compile + image / hot-swap + image", FRESH, SWAP)
    m.ratio("hot-swap + image / same-LoRA image", SWAP, SAME)
