"""`engine bench`: run benchmark scenarios and write the markdown / JSON / PNG report.

Registered into the main CLI by `add_bench_parser(subparsers)`; also runnable alone as
`python -m engine.bench.cli bench --scale tiny --quick`. Imports stay inside the command so `engine --help` is fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.device import resolve_device
    from .report import to_markdown, write_outputs
    from .runner import Settings, run_benchmark
    from .scenario import load_scenario, scenario_paths

    scenarios, notes = [], []
    try:
        paths = scenario_paths(args.scenario)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    only = [n.strip() for group in args.presets or [] for n in group.split(",") if n.strip()]
    for path in paths:
        try:
            scenarios.append(load_scenario(path, args.scale, quick=args.quick, model=args.model, steps=args.steps,
                                           only=only or None))
        except ValueError as e:
            if args.scenario:  # asked for by name: a missing scale is an error, not a note
                print(f"error: {e}", file=sys.stderr)
                return 2
            notes.append(str(e))
    if not scenarios:
        print("error: no scenario to run" + (f" ({'; '.join(notes)})" if notes else ""), file=sys.stderr)
        return 2
    unknown = [n for n in only if not any(n in sc.preset_names for sc in scenarios)]
    if unknown:
        known = sorted({n for sc in scenarios for n in sc.preset_names})
        print(f"error: no preset {', '.join(map(repr, unknown))} in the scenarios (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    scenarios = [sc for sc in scenarios if sc.presets]
    for note in notes:
        print(f"note: skipping {note}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    settings = Settings(device=resolve_device(args.device), runs=runs, warmup=warmup, count_flops=not args.no_flops,
                        count_reference=not (args.no_reference_count or args.quick),
                        progress=not args.no_progress and sys.stderr.isatty())
    result, rows = run_benchmark(scenarios, settings)
    result = {"command": args.command_line or _invocation(), **result, "skipped_scenarios": notes}
    paths = write_outputs(result, rows, Path(args.out), images=not args.no_images)
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _invocation() -> str:
    """The command as typed: `python -m engine.bench.cli bench ...` or `engine bench ...`."""
    prog = "python -m engine.bench.cli" if sys.argv[0].endswith(("bench/cli.py", "engine.bench.cli")) else "engine"
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the main CLI's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark presets against stock diffusers (speed, memory, FLOPs, quality)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "small", "real"], default="tiny",
                   help="tiny/small: offline random-weight models (small = real block structure, reduced widths); "
                        "real: the scenario's real model id (weights must be available)")
    p.add_argument("--model", help="run the scenarios on this model id / path instead of the scale's model")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, 1 timed run, only presets marked quick (no compilation), published "
                        "reference FLOPs")
    p.add_argument("--scenario", action="append",
                   help="scenario name (engine/bench/scenarios/NAME.yaml, shipped with the package) or path "
                        "to a YAML file; repeatable; default: every default one")
    p.add_argument("--out", default="bench-results", help="output folder for bench.json, bench.md, bench.png")
    p.add_argument("--steps", type=int, help="override the scenarios' step count (few-step presets keep theirs)")
    p.add_argument("--presets", action="append", metavar="NAME[,NAME...]",
                   help="run only these presets (comma-separated or repeated; each must be some scenario's)")
    p.add_argument("--runs", type=int, help="timed runs per preset (default 3, 1 with --quick)")
    p.add_argument("--warmup", type=int, help="warm-up runs per preset (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs (no FLOPs / utilisation)")
    p.add_argument("--no-reference-count", action="store_true",
                   help="use the published FLOPs of the reference jobs unless already counted (on the meta device, "
                        "cached); implied by --quick")
    p.add_argument("--no-images", action="store_true", help="don't save each preset's image")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--command-line", help=argparse.SUPPRESS)  # the command recorded in the report
    p.set_defaults(func=cmd_bench)
    return p


def run_entry_point(fixed: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """A benchmark script as a thin entry point: `engine bench` with the script's arguments (`fixed`), then the
    caller's (which win: argparse keeps the last value; --scenario / --presets add up). The result files record
    the script's command line and what it expands to."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = " ".join(["python", sys.argv[0], *(shlex.quote(a) for a in argv)])
    expanded = " ".join(["python -m engine.bench.cli bench", *(shlex.quote(a) for a in [*fixed, *argv])])
    return main(["bench", *fixed, *argv, "--command-line", f"{script}  (= {expanded})"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
