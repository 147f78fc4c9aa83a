"""Command line: `engine generate | upscale | models | schedulers | plan | serve | bench`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import EngineError


def _output_paths(out: str, count: int) -> list[Path]:
    """`out` may hold `{i}`; otherwise several images get `-0`, `-1`, ... before the suffix."""
    if "{i}" in out:
        return [Path(out.format(i=i)) for i in range(count)]
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


# Log lines from libraries that tell the user of the command nothing they can act on: (logger, message pattern).
# Filtered by the CLI only (`filter_library_noise`, from `main`); library users of `engine` see them as the
# libraries intend.
# torchao comes in through diffusers (its quantizers import it whenever it is installed), not through the engine.
LIBRARY_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", r"Failed to load .*\.so"),  # native kernels built for another torch / Python / CUDA
    ("torchao.kernel.intmm", r".*Detected no triton"),  # CPU-only torch
    ("torch.utils._pytree", r".*is an Enum subclass and is now natively supported"),  # torchao's registrations
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor objects"),
    # the untruncated tokenization that measures what a long prompt loses (the engine's own line says what was cut)
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified maximum"),
)
# Python warnings of the same kind: (category, message pattern), matched from the message's start.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch.compile tracing diffusers' own `is_torch_version` helper (inside its up/down-sampling blocks)
    (UserWarning, r"Dynamo detected a call to a `functools.lru_cache`-wrapped function"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_noise_filtered = False


def filter_library_noise() -> None:
    """Drop the `LIBRARY_NOISE` log lines (a filter on each of those loggers: other messages still show) and the
    `LIBRARY_WARNINGS`. Once per process (tests call `main` many times)."""
    global _noise_filtered
    if _noise_filtered:
        return
    _noise_filtered = True
    for name, pattern in LIBRARY_NOISE:
        logging.getLogger(name).addFilter(_DropMessages(pattern))
    for category, pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    from .pipelines.base import PromptTruncatedWarning

    # For library users; the CLI already prints the same as a log line (engine.pipelines.base).
    warnings.filterwarnings("ignore", category=PromptTruncatedWarning)


def _quiet_libraries(quiet: bool, progress: bool) -> None:
    """With `quiet`, nothing below an error from any library; the libraries' own progress bars (hub downloads)
    only when ours are shown."""
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        for name in ("torch", "torchao", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _show_progress(args: argparse.Namespace) -> bool:
    from .progress import interactive

    return not args.quiet and interactive()


def _say(args: argparse.Namespace, text: object) -> None:
    """A line for a person: on stdout unless --quiet or --json (whose stdout is the JSON object alone)."""
    if not args.quiet and not args.json:
        print(text)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import Engine

    progress = _show_progress(args)
    _quiet_libraries(args.quiet, progress)
    overrides = {k: v for k, v in (("backend", args.backend), ("parallel", args.parallel)) if v} or None
    from .runtime.planner import engine_memory_kwargs
    from .scaleout.parallel import join_process_group

    rank = join_process_group(args.device)  # under torchrun: every rank runs the request, rank 0 writes it
    try:
        engine = Engine(device=rank.device, opt_level=args.opt_level, compile_config=overrides,
                        allow_pickle=args.allow_pickle, **engine_memory_kwargs(args))
        with rank.rank_zero_first():
            load_time = _load(args, engine, progress and rank.writes_output)
        return _generate(args, engine, load_time, progress and rank.writes_output, rank.writes_output)
    finally:
        if rank.world_size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _load(args: argparse.Namespace, engine: Any, progress: bool) -> float:
    from .progress import activity

    start = time.perf_counter()
    with activity(f"loading {args.model}", enabled=progress):
        engine.load(args.model, config=args.config)
    return time.perf_counter() - start


def _generate(args: argparse.Namespace, engine: Any, load_time: float, progress: bool, writes: bool) -> int:
    from .progress import StepBar

    if args.verbose and writes:
        _say(args, engine.optimization_report(args.model))
    fields = {
        "model": args.model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "width": args.width,
        "height": args.height, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
        "num_images": args.num_images, "seed": args.seed, "max_sequence_length": args.max_sequence_length,
        "scheduler": args.scheduler,
    }
    with StepBar(enabled=progress) as steps:
        result = engine.generate(**{k: v for k, v in fields.items() if v is not None}, step_callback=steps)
    if not writes:
        return 0
    paths = _output_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    if args.json:
        report = engine.optimization_report(args.model)  # after the run: its compile stats count this job
        _print_json({
            "command": "generate", "model": result.model, "paths": [str(p) for p in paths], "seed": result.seed,
            "width": result.width, "height": result.height, "num_images": len(result.images),
            "num_inference_steps": result.num_inference_steps, "guidance_scale": result.guidance_scale,
            "timings": result.timings, "load_time": load_time, "report": report.as_dict(),
        })
        return 0
    timings = ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items())
    _say(args, f"seed {result.seed}; {result.width}x{result.height}, {result.num_inference_steps} steps; {timings}")
    for path in paths:
        _say(args, f"wrote {path}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from .api import Engine
    from .progress import TileBar, activity, reporting_tiles
    from .registry import find_spec

    progress = _show_progress(args)
    _quiet_libraries(args.quiet, progress)
    engine = Engine(device=args.device, opt_level=args.opt_level, allow_pickle=args.allow_pickle)
    report, load_time = None, None
    spec = find_spec(args.model)
    if spec is not None and spec.family_spec.task == "upscale":  # a registry id: load it now (report, load time)
        start = time.perf_counter()
        with activity(f"loading {args.model}", enabled=progress):
            report = engine.optimization_report(args.model)
        load_time = time.perf_counter() - start
    with TileBar(enabled=progress) as tiles, reporting_tiles(tiles):
        result = engine.upscale(args.image, model=args.model, overlapping_tiles=args.overlapping_tiles,
                                seed=args.seed, shared_style=args.shared_style)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    if args.json:
        _print_json({
            "command": "upscale", "model": result.model, "paths": [str(out)], "seed": result.seed,
            "width": result.image.width, "height": result.image.height, "tiles": result.tiles,
            "timings": result.timings, "load_time": load_time,
            "report": report.as_dict() if report is not None else None,
        })
        return 0
    timings = ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items())
    _say(args, f"seed {result.seed}; {result.image.width}x{result.image.height} from {result.tiles} tiles; {timings}")
    _say(args, f"wrote {out}")
    return 0


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing but errors (no progress bars, no library warnings)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (paths, seed, size, timings, model, optimization "
                             "report) and nothing else there")


def cmd_models(args: argparse.Namespace) -> int:
    from .api import Engine

    rows = Engine.models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("id", "family", "task", "offline", "source")
    table = [header] + [(r["id"], r["family"], r["task"], "yes" if r["offline"] else "no", r["source"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from .schedulers import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, preset in PRESETS.items():
        print(f"{name.ljust(width)}  {'/'.join(preset.families):10}  {preset.description}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan a model gets (no weight is read), or the table of plans on common cards."""
    from .runtime import memory

    if args.table:
        models = args.model.split(",") if args.model else list(memory.TABLE_MODELS)
        rows = memory.plan_table(models, dtype=args.dtype, allow_lossy=args.allow_lossy,
                                 max_host_memory=args.host_memory)
        text = memory.markdown_table(rows)
        if args.out:
            options = [f"--model {args.model}" if args.model else "", f"--dtype {args.dtype}" if args.dtype != "bf16"
                       else "", f"--host-memory {args.host_memory}" if args.host_memory else "",
                       "--allow-lossy" if args.allow_lossy else "", f"--out {args.out}"]
            command = " ".join(["engine plan --table", *[o for o in options if o]])
            host = f"host RAM {args.host_memory}" if args.host_memory else "host RAM not limited"
            header = (f"`{command}`\n\n"
                      "Which memory plan each model gets on common cards (`--max-memory <N>GB`, 10^9 bytes) at the "
                      f"model's default size, {args.dtype}, one image, {host}"
                      f"{', lossy storage allowed' if args.allow_lossy else ''}: the plan, its expected device peak "
                      "and the host RAM it keeps weights in. Estimated from the shipped configs on the meta device "
                      "(no weights read); see engine/runtime/memory.py for the activation estimate.\n\n")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(header + text + "\n", encoding="utf-8")
        print(text)
        return 0
    if not args.model:
        print("error: --model is required (or --table)", file=sys.stderr)
        return 2
    plan = memory.plan_for_model(args.model, max_memory=args.max_memory, device=args.device, width=args.width,
                                 height=args.height, num_images=args.num_images, dtype=args.dtype,
                                 allow_lossy=args.allow_lossy, max_host_memory=args.host_memory)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan.describe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Local inference engine for diffusion image models")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--model", required=True, help="registry id (see `engine models`), diffusers folder, .safetensors file or hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int, help="number of inference steps (default: the model's)")
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--max-sequence-length", type=int, help="FLUX: T5 tokens")
    gen.add_argument("--scheduler", help="scheduler preset (see `engine schedulers`); default: the model's")
    gen.add_argument("--out", default="out.png", help="output file, or a pattern with {i} for several images")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--config", help="for a single file: registry id or diffusers folder describing its architecture")
    gen.add_argument("--opt-level", choices=["O0", "O1", "O2", "O3"],
                     help="optimization level (default: O2 on CUDA, O0 elsewhere)")
    gen.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"],
                     help="runtime of the denoiser and VAE decoder (exported to ONNX for onnxruntime / TensorRT; "
                          "falls back to the next-best with the reason in --verbose)")
    gen.add_argument("--parallel", choices=["auto", "off", "context", "ulysses", "ring"],
                     help="several devices for one request (default auto); context/ulysses/ring: FLUX context "
                          "parallel over the ranks of `torchrun --nproc-per-node N -m engine.cli generate ...` "
                          "(rank 0 writes the output)")
    gen.add_argument("--verbose", action="store_true", help="print the optimization report")
    gen.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (.ckpt/.bin)")
    from .runtime.planner import add_memory_arguments

    add_memory_arguments(gen)
    _add_output_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    up = sub.add_parser("upscale", help="4x upscale with AuraSR")
    up.add_argument("--image", required=True, help="input: path, http(s) URL or data URI")
    up.add_argument("--model", default="aura-sr", help="aura-sr, aura-sr-v2, tiny-aura-sr, a folder or a file")
    up.add_argument("--out", default="upscaled.png")
    up.add_argument("--overlapping-tiles", action="store_true", help="second pass offset by half a tile (fewer seams, ~2x cost)")
    up.add_argument("--shared-style", action="store_true", help="one style for all tiles (faster)")
    up.add_argument("--seed", type=int)
    up.add_argument("--device", default="auto")
    up.add_argument("--opt-level", choices=["O0", "O1", "O2", "O3"])
    up.add_argument("--allow-pickle", action="store_true")
    _add_output_arguments(up)
    up.set_defaults(func=cmd_upscale)

    models = sub.add_parser("models", help="list registered models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    scheds = sub.add_parser("schedulers", help="list scheduler presets and the families they fit")
    scheds.set_defaults(func=cmd_schedulers)

    plan = sub.add_parser("plan", help="memory plan for a model on a device budget (no weights loaded)")
    plan.add_argument("--model", help="registry id or diffusers folder (with --table: comma-separated ids)")
    plan.add_argument("--max-memory", help="device budget, e.g. 24GB (10^9 bytes), 24GiB, 12000MB; default: the "
                      "free memory of --device")
    plan.add_argument("--host-memory", help="host RAM budget for offloaded weights (default: unlimited with "
                      "--max-memory, available RAM otherwise)")
    plan.add_argument("--device", default="cuda", help="device kind the plan is for (cuda, mps, cpu)")
    plan.add_argument("--width", type=int)
    plan.add_argument("--height", type=int)
    plan.add_argument("--num-images", type=int, default=1)
    plan.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    plan.add_argument("--allow-lossy", action="store_true", help="allow fp8 / int8 / nf4 weight storage")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--table", action="store_true", help="markdown table: sd15/sdxl/flux x 8-80 GB cards")
    plan.add_argument("--out", help="with --table: also write the table (and the command) to this file")
    plan.set_defaults(func=cmd_plan)

    from .bench.cli import add_bench_parser
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    filter_library_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
