"""Measurements that are not a scenario's presets (a LoRA swap, server overhead, a cold start) in the harness's terms:
the same synchronised timer and summary (median, min-max, spread of >= 3 runs), the same environment record, and
the same result format as `engine bench` (JSON + markdown, each starting with the exact command, then the machine:
CPU model, cores, flags, native bf16, load average at start and end).

A benchmark script is then a thin entry point: it builds its callables and hands them to `Measurements`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .metrics import summarize, timed


@dataclass
class Series:
    """One timed quantity: its runs, their summary, and anything else worth keeping beside it."""

    name: str
    times_s: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def timing(self) -> dict[str, float]:
        return summarize(self.times_s) if self.times_s else {}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "times_s": self.times_s, "timing": self.timing, **self.extra}


class Measurements:
    """Collects series for one result file. `time(name, fn)` runs `fn` once under the harness timer and appends to
    the series `name`; callers interleave their quantities round by round so load from other work falls on all."""

    def __init__(self, title: str, command: str, device: torch.device | str = "cpu", runs: int = 3):
        from .env import environment

        self.title = title
        self.command = command
        self.device = torch.device(device)
        self.runs = runs
        self.started = time.time()
        self.environment = environment(self.device)
        self.series: dict[str, Series] = {}
        self.figures: dict[str, Any] = {}  # derived figures (ratios of medians), named
        self.notes: list[str] = []

    def get(self, name: str) -> Series:
        return self.series.setdefault(name, Series(name))

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        dt, out = timed(fn, self.device)
        self.get(name).times_s.append(dt)
        return out

    def add(self, name: str, seconds: float) -> None:
        """A time taken by the caller's own clock (e.g. a server's wall time minus its reported inference time)."""
        self.get(name).times_s.append(seconds)

    def median(self, name: str) -> float:
        return self.series[name].timing["median_s"]

    def ratio(self, label: str, slower: str, faster: str) -> float:
        """median(slower) / median(faster), both from this run; recorded under `label`."""
        value = self.median(slower) / self.median(faster)
        self.figures[label] = value
        return value

    def result(self) -> dict[str, Any]:
        from .env import load_average

        self.environment["load_average_end"] = load_average()
        return {"command": self.command, "title": self.title, "environment": self.environment,
                "settings": {"runs": self.runs, "device": str(self.device)},
                "series": [s.as_dict() for s in self.series.values()], "figures": self.figures, "notes": self.notes,
                "duration_s": time.time() - self.started}

    def write(self, out: Path | str) -> dict[str, Path]:
        """`out`.json and `out`.md (out is a path without suffix); returns the paths and prints the markdown."""
        from .report import to_json

        result = self.result()
        stem = Path(out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = {"json": stem.with_suffix(".json"), "markdown": stem.with_suffix(".md")}
        paths["json"].write_text(to_json(result))
        md = measurements_markdown(result)
        paths["markdown"].write_text(md)
        print(md)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return paths


def _ms_or_s(s: float) -> str:
    from .report import duration

    return f"{1e3 * s:.1f} ms" if s < 1 else duration(s)


def measurements_markdown(result: dict[str, Any]) -> str:
    from .report import machine_line

    env = result["environment"]
    lines = [f"Command: `{result['command']}`", "", f"# {result['title']}", "", machine_line(env),
             f"Device: {env['device']} ({env['device_name']}, {env['torch_threads']} threads); torch {env['torch']}, "
             f"diffusers {env['diffusers']}; git {(env.get('git_commit') or 'unknown')[:12]}"
             + (" (uncommitted changes)" if env.get("git_dirty") else "") + ".",
             "Timer: device-synchronised wall clock; median, min–max and spread ((max − min) / median) over the "
             "runs, taken round-robin with the other rows.", "",
             "| measurement | median | min–max (spread) | runs | details |", "|---|---|---|---|---|"]
    for s in result["series"]:
        t = s["timing"]
        extra = "; ".join(f"{k}: {v}" for k, v in s.items() if k not in ("name", "times_s", "timing"))
        if not t:
            lines.append(f"| {s['name']} | – | – | 0 | {extra} |")
            continue
        rng = f"{_ms_or_s(t['min_s'])}–{_ms_or_s(t['max_s'])} ({100 * t['spread']:.0f}%)"
        lines.append(f"| {s['name']} | {_ms_or_s(t['median_s'])} | {rng} | {t['runs']} | {extra} |")
    if result["figures"]:
        lines += ["", "Figures (ratios of medians from this run):", ""]
        lines += [f"- {k}: {v:.3g}" + ("x" if isinstance(v, float) else "") for k, v in result["figures"].items()]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def script_command(argv: list[str]) -> str:
    """`python benchmarks/x.py args` as typed (for the first line of a result file)."""
    import shlex
    import sys

    return " ".join(["python", sys.argv[0], *(shlex.quote(a) for a in argv)])
