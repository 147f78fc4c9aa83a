"""Export backends (onnxruntime; TensorRT where there is CUDA) vs torch eager and stock diffusers (fp32 and bf16) on
the small SDXL and FLUX models: `engine bench` with these presets. Extra arguments go to `engine bench` and win.
`python benchmarks/backends_speed.py [--steps 4] [--threads 1]`"""

import sys

from engine.bench.cli import run_entry_point

ARGS = ["--scale", "small", "--scenario", "sdxl", "--scenario", "flux",
        "--presets", "diffusers,diffusers-bf16,O0,onnxruntime,tensorrt", "--out", "benchmarks/results/backends_cpu"]

if __name__ == "__main__":
    sys.exit(run_entry_point(ARGS))
