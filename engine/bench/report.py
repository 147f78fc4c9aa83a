"""Outputs of a benchmark run: a markdown table (stdout and bench.md), bench.json with every figure and the
environment, bench.png (time per preset by stage, quality as labels), and each preset's image for a visual check."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from .reference import AURASR_FLOPS, published_line
from .scenario import STAGES


# -- formatting -----------------------------------------------------------------------------------------------------

def duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.3g} s" if s < 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def _bytes(n: int | None) -> str:
    return "–" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _flops(f: float | None) -> str:
    if f is None:
        return "–"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.0f} FLOP"


def is_baseline(row: dict[str, Any]) -> bool:
    return row["kind"] == "stock" and row.get("dtype") == "fp32"


def quality(row: dict[str, Any], kind: str = "psnr") -> str:
    if is_baseline(row):
        return "baseline"
    if row.get("identical"):
        return "identical" if kind == "psnr" else "1.000"
    if kind == "psnr":
        text = _num(row.get("psnr_db"), "{:.1f}")
        if row.get("job_differs") and row.get("ssim_same_job") is not None:
            same = row.get("psnr_same_job_db")
            text += f" (same job: {'identical' if same is None else f'{same:.1f}'})"
        return text
    text = _num(row.get("ssim"), "{:.3f}")
    same = row.get("ssim_same_job")
    return text + (f" (same job: {same:.3f})" if row.get("job_differs") and same is not None else "")


def _stages(job: dict[str, Any]) -> tuple[str, ...]:
    return STAGES[job.get("task", "text-to-image")]


def _preset_label(row: dict[str, Any], scenario_job: dict[str, Any]) -> str:
    job, diff = row["job"], []
    for flag in ("overlapping_tiles", "shared_style"):
        if job.get(flag) and not scenario_job.get(flag):
            diff.append(flag.replace("_", " "))
    if job["steps"] != scenario_job["steps"]:
        diff.append(f"{job['steps']} steps")
    if job["guidance_scale"] != scenario_job["guidance_scale"]:
        diff.append(f"guidance {job['guidance_scale']}")
    if job["scheduler"] != scenario_job["scheduler"]:
        diff.append(str(job["scheduler"]))
    return row["preset"] + (f" ({', '.join(diff)})" if diff else "")


# -- markdown -------------------------------------------------------------------------------------------------------

def header(stages: tuple[str, ...]) -> str:
    return (f"| preset | dtype | load | first image | median | min–max (spread) | {' / '.join(stages)} (s) "
            "| vs stock fp32 | vs stock bf16 | peak memory (above start) | FLOPs / image | FLOP/s | util. | PSNR dB "
            "| SSIM |")


COLUMNS = 15


def spread(timing: dict[str, Any]) -> str:
    if "max_s" not in timing:
        return "–"
    return f"{duration(timing['min_s'])}–{duration(timing['max_s'])} ({100 * timing['spread']:.0f}%)"


def _row_md(row: dict[str, Any], scenario_job: dict[str, Any]) -> str:
    st, mem, t = row["stages_s"], row["memory"], row["timing"]
    stages = " / ".join(f"{st.get(s, 0.0):.3f}" for s in _stages(scenario_job))
    memory = f"{_bytes(mem.get('peak_bytes'))} (+{_bytes(mem.get('peak_above_start_bytes'))})" if mem else "–"
    util = f"{100 * row['utilisation']:.2g}%" if row["utilisation"] else "–"
    achieved = _flops(row["achieved_flops_per_s"]) + "/s" if row["achieved_flops_per_s"] else "–"
    cells = [_preset_label(row, scenario_job), row["dtype"] or "–", duration(row["load_s"]),
             duration(row["first_image_s"]), duration(t["median_s"]), spread(t), stages,
             _num(row["speedup"], "{:.2f}x"), _num(row.get("speedup_bf16"), "{:.2f}x"), memory,
             _flops(row["flops_per_image"]), achieved, util,
             quality(row, "psnr"), quality(row, "ssim")]
    return "| " + " | ".join(cells) + " |"


def _reference_md(ref: dict[str, Any]) -> list[str]:
    counted, published = ref["flops_counted"], ref["flops_published"]
    source = (f"{_flops(counted)} counted here" if counted else "not counted in this run") + (
        f", published ≈ {_flops(published)}" if published else ", not published")
    lines = [f"**{ref['title']}** — denoiser {source}.", ""]
    if ref["floor_s"]:
        lines.append("- FLOP floor on this device (at the measured matmul peak): " + "; ".join(
            f"{d} {duration(s)}" for d, s in ref["floor_s"].items()))
    if ref["projected_s"]:
        lines.append("- projected here at each preset's measured utilisation: " + "; ".join(
            f"{p} {duration(s)}" for p, s in ref["projected_s"].items()))
    for run in ref["published"]:
        key = f"{run['gpu']}, {run['setup']}"
        implied = ref["implied_utilisation"].get(key)
        extra = f" — implied utilisation {100 * implied:.0f}% of the datasheet bf16 peak" if implied else ""
        lines.append(f"- {published_line(run)}{extra}")
    return lines + [""]


def _job_title(job: dict[str, Any]) -> str:
    if job.get("task") == "upscale":
        return f"{job['model']}, {job['width']}x{job['height']} input -> 4x"
    mode = job.get("mode", "text2img")
    extra = "" if mode == "text2img" else f", {mode}"
    extra += f" (strength {job['strength']})" if job.get("strength") is not None else ""
    extra += f" ({job['controlnet']}, scale {job['conditioning_scale']})" if job.get("controlnet") else ""
    return (f"{job['model']} {job['width']}x{job['height']}, {job['steps']} steps, guidance {job['guidance_scale']}"
            f"{extra}")


def machine_line(env: dict[str, Any]) -> str:
    """CPU model, cores, the flags bf16 speed depends on, native bf16 or not, and the load before and after: a CPU
    figure means little without them (other work on a shared machine shows in the load and the spread)."""
    load = " → ".join("/".join(f"{x:.2f}" for x in la) for la in (env.get("load_average_start"),
                                                                 env.get("load_average_end")) if la)
    flags = ", ".join(env.get("cpu_flags") or []) or "none of avx2/avx512f/avx512_bf16/amx"
    return (f"Machine: {env.get('cpu_model')}, {env.get('cpu_count')} cores (flags: {flags}); native bf16: "
            f"{'yes' if env.get('native_bf16') else 'no'} ({env.get('native_bf16_detail')}); load average "
            f"(1/5/15 min) at start → end: {load or 'unknown'}.")


def to_markdown(result: dict[str, Any]) -> str:
    env, settings = result["environment"], result["settings"]
    commit = (env.get("git_commit") or "unknown")[:12] + (" (uncommitted changes)" if env.get("git_dirty") else "")
    peaks = "; ".join(f"{d} {_flops(p['flops_per_s'])}/s ({p['size']}² matmul)" for d, p in result["peaks"].items()
                      if p.get("flops_per_s"))
    lines = [f"Command: `{result.get('command', '')}`", "", "# engine bench", "", machine_line(env),
             f"Device: {env['device']} ({env['device_name']}, {env['torch_threads']} threads); torch {env['torch']}, "
             f"diffusers {env['diffusers']}, transformers {env['transformers']}, onnxruntime {env['onnxruntime']}, "
             f"tensorrt {env['tensorrt']}; git {commit}.",
             f"Measured device peak: {peaks or 'not measured'}.",
             f"Per preset: {settings['warmup']} warm-up run(s) (the first is 'first image': it pays compilation), then "
             f"{settings['runs']} timed run(s), device-synchronised; median, min–max and spread ((max − min) / "
             f"median). Speed-ups are stock's median over the preset's, both from this run. FLOPs are counted with "
             f"FlopCounterMode on an eager stock run of each job (model FLOPs: work a cache skips still counts). "
             f"Quality is against the baseline's images, same seed. Total time {duration(result.get('duration_s'))}.",
             ""]
    for sc in result["scenarios"]:
        job = sc["job"]
        lines += [f"## {sc['name']} — {_job_title(job)} ({sc['description']})", "", header(_stages(job)),
                  "|" + "---|" * COLUMNS]
        ok = [r for r in sc["rows"] if r["status"] == "ok"]
        lines += [_row_md(r, job) for r in ok]
        skipped = [r for r in sc["rows"] if r["status"] != "ok"]
        if skipped:
            lines += ["", "Skipped:"] + [f"- {r['preset']}: {r['reason']}" for r in skipped]
        notes = sorted({f"{r['preset']}: {n}" for r in ok for n in r["notes"]}) + sc["notes"]
        if notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in notes]
        if sc["flops"]:
            lines += ["", f"FLOPs per job (per stage: {' + '.join(_stages(job))}):"]
            for label, c in sc["flops"].items():
                st = c["stages"]
                lines.append(f"- {label}: {_flops(c['total'])} = " + " + ".join(
                    _flops(st.get(s, 0)) for s in _stages(job)))
        if sc["reference"]:
            lines += ["", "### Published reference jobs", "",
                      "Projections use the utilisation measured on this run's model; small models use the hardware "
                      "less well than the published ones, so they are upper bounds.", ""]
            for ref in sc["reference"]:
                lines += _reference_md(ref)
        lines.append("")
    if any(sc["reference"] or sc["job"].get("task") == "upscale" for sc in result["scenarios"]):
        lines.append("AuraSR (published FLOPs, no published time): " + "; ".join(
            f"{k} {_flops(v)}" for k, v in AURASR_FLOPS.items()) + ".")
    return "\n".join(lines) + "\n"


# -- JSON -----------------------------------------------------------------------------------------------------------

def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as null (PSNR of identical images is flagged by `identical` instead)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(_finite(result), indent=1, default=str, allow_nan=False)


# -- plot -----------------------------------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal stacked bars of median time per preset (the task's stages, then other), one panel per scenario;
    each bar labelled with its median, speed-up and quality, skipped presets named with their reason. Stage bars are
    per-stage medians, so with noisy runs their sum can differ a little from the median total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    heights = [max(2.0, 0.45 * len(sc["rows"]) + 1.2) for sc in scenarios]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    palette = ("#8fb3d9", "#2f6db5", "#f2a541")  # first / main / last stage of either task
    for ax, sc in zip(axes[:, 0], scenarios, strict=True):
        rows = sc["rows"]
        labelled: set[str] = set()  # legend entries once per panel, whichever row comes first
        names = [_preset_label(r, sc["job"]) for r in rows]
        longest = max([r["timing"].get("median_s", 0.0) for r in rows if r["status"] == "ok"] or [1.0])
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                ax.text(0.01 * longest, i, f"skipped: {(r['reason'] or '')[:90]}", va="center", fontsize=7,
                        color="#a33")
                continue
            left = 0.0
            for stage, color in zip(_stages(sc["job"]), palette):
                w = r["stages_s"].get(stage, 0.0)
                ax.barh(i, w, left=left, color=color, label=stage if stage not in labelled else None)
                labelled.add(stage)
                left += w
            other = max(0.0, r["timing"]["median_s"] - left)
            ax.barh(i, other, left=left, color="#bbbbbb", label="other" if "other" not in labelled else None)
            labelled.add("other")
            speed = f"{r['speedup']:.2f}x" if r["speedup"] else ""
            q = quality(r, "psnr")
            if q not in ("baseline", "identical"):
                q = f"PSNR {_num(r['psnr_db'], '{:.1f}')} dB, SSIM {_num(r['ssim'], '{:.3f}')}"
            end = max(left + other, r["timing"]["median_s"])  # per-stage medians may add up past the median
            ax.text(end + 0.01 * longest, i, f"{duration(r['timing']['median_s'])} · {speed} · {q}", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.set_ylim(len(rows) - 0.4, -0.6)  # top to bottom in scenario order, room for the last row's text
        ax.set_xlim(0, longest * 1.9)
        ax.set_xlabel("median time per image (s)", fontsize=8)
        ax.set_title(f"{sc['name']}: {_job_title(sc['job'])}", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper right")
    env = result["environment"]
    fig.suptitle(f"engine bench on {env['device_name']} ({env['device']}), torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- everything -----------------------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def write_outputs(result: dict[str, Any], rows: dict[str, list[Any]], out: Path, *,
                  images: bool = True) -> dict[str, Path]:
    """bench.json, bench.md, bench.png (and images/<scenario>/<preset>.png) under `out`; returns the paths. Without
    matplotlib (the `bench` extra) the plot is left out with a warning: the figures matter more than the picture."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(to_json(result))
    paths["markdown"].write_text(to_markdown(result))
    try:
        plot(result, paths["plot"])
    except ImportError as e:
        warnings.warn(f"no plot ({e}); pip install 'engine[bench]' for matplotlib", stacklevel=2)
        del paths["plot"]
    if images:
        for scenario, scenario_rows in rows.items():
            for row in scenario_rows:
                if row.images:
                    target = out / "images" / _slug(scenario) / f"{_slug(row.preset)}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    row.images[0].save(target)
    return paths
