"""LoRA hot-swap on a compiled model vs a fresh compile (engine/bench/lora_swap.py, the harness's timers and result
format). `python benchmarks/lora_swap.py [--model tiny-sdxl] [--runs 3] [--out benchmarks/results/lora_swap_cpu]`"""

import argparse
import sys

from engine.bench.lora_swap import measure_lora_swap
from engine.bench.measurement import Measurements, script_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="benchmarks/results/lora_swap_cpu")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    m = Measurements("LoRA hot-swap on a compiled model", script_command(sys.argv[1:]), runs=args.runs)
    measure_lora_swap(m, model=args.model, size=args.size, steps=args.steps)
    m.write(args.out)
