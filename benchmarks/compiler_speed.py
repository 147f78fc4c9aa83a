"""Optimization levels vs stock diffusers (fp32 and bf16) on the small SDXL and FLUX models: `engine bench` with
these presets (engine/bench/scenarios/{sdxl,flux}.yaml). Extra arguments go to `engine bench` and win.
`python benchmarks/compiler_speed.py [--steps 8] [--threads 1]`"""

import sys

from engine.bench.cli import run_entry_point

ARGS = ["--scale", "small", "--scenario", "sdxl", "--scenario", "flux",
        "--presets", "diffusers,diffusers-bf16,O0,O1,O2", "--out", "benchmarks/results/compiler_cpu"]

if __name__ == "__main__":
    sys.exit(run_entry_point(ARGS))
