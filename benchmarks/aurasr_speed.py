"""AuraSR 4x upscaling, the engine's upscaler vs the reference aura-sr package (fp32, and bf16 autocast) on the same
weights and seed: `engine bench --scenario aurasr` (engine/bench/scenarios/aurasr.yaml; tiny or real scale). Extra
arguments go to `engine bench` and win. `python benchmarks/aurasr_speed.py [--scale real] [--threads 1]`"""

import sys

from engine.bench.cli import run_entry_point

ARGS = ["--scale", "tiny", "--scenario", "aurasr", "--out", "benchmarks/results/aurasr_cpu"]

if __name__ == "__main__":
    sys.exit(run_entry_point(ARGS))
