"""A few-step schedule (4 steps, no guidance, Euler trailing) vs the scenario's full schedule, stock diffusers (fp32
and bf16) and O1 on the small SDXL model: `engine bench` with these presets. Extra arguments go to `engine bench`.
`python benchmarks/fewstep_speed.py [--steps 25] [--threads 1]`"""

import sys

from engine.bench.cli import run_entry_point

ARGS = ["--scale", "small", "--scenario", "sdxl", "--presets", "diffusers,diffusers-bf16,O1,few-step",
        "--out", "benchmarks/results/fewstep_cpu"]

if __name__ == "__main__":
    sys.exit(run_entry_point(ARGS))
