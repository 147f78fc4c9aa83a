"""The benchmark harness behind `engine bench`: scenarios (engine/bench/scenarios/*.yaml) -> runs -> report.

Lives inside the package (not in benchmarks/) so the console script works from an installed package; the scenario
files and committed results stay in benchmarks/. Modules: scenario (YAML -> typed scenarios), runner (scenarios ->
runs), presets (stock and engine runs of image generation jobs), inputs (the synthetic image, mask and control
image of img2img / inpaint / ControlNet jobs), upscale (the same for AuraSR: input image, reference baseline),
metrics (timers, stage probes, memory, FLOPs, device peak), quality (PSNR, SSIM), reference (published numbers,
projections), report (markdown, JSON, PNG), env (versions, device, CPU and bf16, load, commit), cli
(`engine bench`, and `run_entry_point` for the benchmarks/*.py scripts), measurement (timed quantities that are not
presets, in the same result format) and lora_swap (one such measurement). Nothing is imported here, so registering
the CLI command costs no torch import.
"""
