"""GPU smoke run: every optimization level and backend on tiny and small models (and real ones whose weights are in
the local HF cache), LoRA off and on, three resolutions; one JSON file, one table, non-zero exit on a crash or a
quality drop. Meant to finish in 5 minutes on one H100/H200-class GPU after `pip install -e .`:

    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json

and to keep working on a machine without a GPU (a few cells on the tiny models, about a minute):

    python benchmarks/gpu_smoke.py --device cpu --quick --out /tmp/gpu_smoke.json

A case is one (model, level, backend) loaded once through the public API: it generates at three resolutions with
LoRA off, then the same with a random LoRA (engine/testing.py) on. Per case: ran or not (with the error), PSNR of
every image against O0 torch (same resolution, same LoRA), graphs compiled after the first image (other
resolutions and the LoRA swap: recompiles), peak torch memory on CUDA, whether CUDA graphs were applied (the
optimization report), times. Thresholds per level are in THRESHOLDS_DB; a LoRA that leaves the image unchanged
(PSNR on vs off above LORA_NO_EFFECT_DB) is a quality failure too (it is how LoRAs get silently dropped).

Time boxes: each case has --case-timeout-s (twice that for TensorRT, which builds an engine per size; an alarm
interrupts the case when Python next runs, so a long native call finishes first), and no case starts after
--budget-s; cases not started are recorded as skipped with the reason. Backends that are not installed are skipped with the reason.
Peak memory is torch's allocator only (onnxruntime's and TensorRT's own allocations are not in it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Minimum PSNR (dB) against O0 torch (fp32, eager) of the same model, resolution, seed and LoRA. Loose on purpose:
# a smoke run catches NaN/black/garbage images and silently skipped work, not drift. O0 on an exported backend is
# the same fp32 math; O1/O2 are half precision (random-weight models amplify rounding); O3 adds lossy step caching
# and quantization.
THRESHOLDS_DB = {"O0": 35.0, "O1": 20.0, "O2": 20.0, "O3": 14.0}
LORA_NO_EFFECT_DB = 60.0  # LoRA on vs off closer than this: the adapter had no effect
STEPS = 4  # per image; --quick uses 2
SEED = 7
PROMPT = "a lighthouse on a cliff at dusk, oil painting"

TINY = ["tiny-sdxl", "tiny-flux", "tiny-sd15"]
SMALL = ["small-sdxl", "small-flux"]
REAL = ["sdxl", "flux-schnell", "sd15", "flux-dev"]  # only when their weights are already in the HF cache
CELLS = [("O0", "torch"), ("O1", "torch"), ("O2", "torch"), ("O3", "torch"),
         ("O0", "onnxruntime"), ("O2", "onnxruntime"), ("O2", "tensorrt")]
# --quick (the CPU check that the script does not rot): the reference, one half-precision level with LoRA, each
# exported backend (TensorRT is skipped with its reason without a GPU), on tiny SDXL; FLUX's reference and onnxruntime.
QUICK = [("tiny-sdxl", "O0", "torch"), ("tiny-sdxl", "O1", "torch"), ("tiny-sdxl", "O0", "onnxruntime"),
         ("tiny-sdxl", "O2", "tensorrt"), ("tiny-flux", "O0", "torch"), ("tiny-flux", "O0", "onnxruntime")]


class CaseTimeout(Exception):
    pass


@dataclasses.dataclass
class Case:
    model: str
    level: str
    backend: str
    status: str = "pending"  # ok | failed (quality) | crashed | timeout | skipped
    reason: str = ""  # why skipped / failed, or the error
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    threshold_db: float | None = None
    min_psnr_db: float | None = None
    lora_effect_db: float | None = None  # min PSNR LoRA on vs off (inf: no effect)
    lora: str = ""  # applied | refused (exported denoiser) | not run
    recompiles: int | None = None  # graphs compiled after the first image
    graphs_compiled: int | None = None
    cuda_graphs: bool | None = None
    backend_used: str = ""  # from the report: what runs the denoiser
    peak_mem_mb: float | None = None
    load_s: float | None = None
    total_s: float | None = None
    report: list[dict[str, str]] = dataclasses.field(default_factory=list)


def psnr(a: Any, b: Any) -> float:
    """The harness's PSNR (engine/bench/quality.py) of two images; inf when identical."""
    from engine.bench.quality import psnr as psnr_images

    return psnr_images([a], [b])


def resolutions(model: str, quick: bool) -> list[tuple[int, int]]:
    """Three sizes around the model's default: the default, a wider one and a smaller one (multiples of 64)."""
    from engine.registry import get_spec

    d = get_spec(model).defaults
    w, h = (64, 64) if quick else (d.width, d.height)
    r = lambda x: max(64, int(round(x / 64)) * 64)  # noqa: E731
    return [(w, h), (r(w * 1.5), h), (r(w / 2), r(h / 2))] if not quick else [(64, 64), (128, 64), (64, 128)]


def backend_missing(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run here (the case is skipped with it), or None."""
    from engine.compiler.export import ort, tensorrt

    if backend == "torch":
        return None
    if importlib.util.find_spec("onnx") is None:
        return "onnx not installed (pip install 'engine[onnx]')"
    if backend == "tensorrt":
        return tensorrt.unavailable_reason(device)
    return ort.unavailable_reason(device)


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Interrupt the case after `seconds` (SIGALRM; the main thread only)."""
    def fire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(case: Case, device: torch.device, sizes: list[tuple[int, int]], lora: Path | None,
             reference: dict[tuple[bool, int, int], Any], steps: int = STEPS) -> None:
    from engine import Engine
    from engine.compiler.compile import compile_counters
    from engine.errors import InvalidRequestError

    torch._dynamo.reset()  # every case compiles from scratch: no recompile limit carried over from another case
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    eng = Engine(device=device, opt_level=case.level)
    try:
        eng.load(case.model, opt_level=case.level, compile_config={"backend": case.backend})
        case.load_s = round(time.perf_counter() - start, 2)
        report = eng.optimization_report(case.model)
        case.report = report.as_dict()["passes"]
        case.cuda_graphs = report.status("cuda_graphs") == "applied"
        case.backend_used = _denoiser_backend(report)
        graphs0 = compile_counters()["unique_graphs"]
        after_first = None
        images: dict[tuple[bool, int, int], Any] = {}
        for with_lora in (False, True):
            if with_lora and lora is None:
                case.lora = "not run (no LoRA for this model)"
                break
            for width, height in sizes:
                loras = [{"path": str(lora), "scale": 1.0}] if with_lora else []
                t0 = time.perf_counter()
                try:
                    result = eng.generate(model=case.model, prompt=PROMPT, width=width, height=height,
                                          num_inference_steps=steps, seed=SEED, loras=loras)
                except InvalidRequestError as e:
                    if with_lora and e.field == "loras":  # an exported denoiser refuses adapters, by design (422)
                        case.lora = f"refused: {e}"
                        break
                    raise
                if after_first is None:
                    after_first = compile_counters()["unique_graphs"]
                key = (with_lora, width, height)
                images[key] = result.images[0]
                if case.level == "O0" and case.backend == "torch":
                    reference[key] = result.images[0]
                ref = reference.get(key)
                case.runs.append({"lora": with_lora, "width": width, "height": height,
                                  "time_s": round(time.perf_counter() - t0, 3),
                                  "psnr_db": None if ref is None else round(psnr(result.images[0], ref), 2)})
            else:
                if with_lora:
                    case.lora = "applied"
        graphs = compile_counters()["unique_graphs"]
        case.graphs_compiled = graphs - graphs0
        case.recompiles = graphs - (after_first if after_first is not None else graphs0)
        effects = [psnr(images[(True, w, h)], images[(False, w, h)]) for w, h in sizes
                   if (True, w, h) in images and (False, w, h) in images]
        case.lora_effect_db = round(min(effects), 2) if effects else None
    finally:
        if device.type == "cuda":
            case.peak_mem_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        eng.unload(case.model)
        case.total_s = round(time.perf_counter() - start, 2)


def _denoiser_backend(report: Any) -> str:
    """What runs the denoiser, from the backend pass's lines ("unet: onnxruntime CUDAExecutionProvider fp16, ...")."""
    for detail in report.details("backend"):
        name, _, rest = detail.partition(": ")
        word = rest.split(" ", 1)[0]
        if name in ("unet", "transformer") and word in ("onnxruntime", "tensorrt"):
            return word
    return "torch"


def judge(case: Case) -> None:
    """ok, or failed with the reason: an image below the level's threshold, or a LoRA without effect."""
    case.threshold_db = THRESHOLDS_DB[case.level]
    scores = [r["psnr_db"] for r in case.runs if r["psnr_db"] is not None]
    case.min_psnr_db = min(scores) if scores else None
    problems = []
    if case.min_psnr_db is not None and case.min_psnr_db < case.threshold_db:
        worst = min((r for r in case.runs if r["psnr_db"] is not None), key=lambda r: r["psnr_db"])
        problems.append(f"PSNR {case.min_psnr_db:.1f} dB < {case.threshold_db:.0f} dB at {worst['width']}x"
                        f"{worst['height']}{' with LoRA' if worst['lora'] else ''}")
    if case.lora == "applied" and case.lora_effect_db is not None and case.lora_effect_db >= LORA_NO_EFFECT_DB:
        problems.append(f"LoRA had no effect (on vs off {case.lora_effect_db} dB)")
    case.status = "failed" if problems else "ok"
    case.reason = "; ".join(problems)
    if case.runs and not scores:
        case.reason = "no O0 torch reference to compare with (it did not run)"


def plan_cases(models: list[str], cells: list[tuple[str, str]]) -> list[Case]:
    """Tiny models first, then small, then real ones; within each group every model's cell before the next cell (so
    the references come first and a spent budget cuts the slowest cells of the biggest models, not whole levels)."""
    groups = [[m for m in models if m in TINY], [m for m in models if m in SMALL],
              [m for m in models if m not in TINY and m not in SMALL]]
    return [Case(m, level, backend) for group in groups for level, backend in cells for m in group]


def table(cases: list[Case]) -> str:
    head = ["model", "level", "backend", "status", "min PSNR", "LoRA", "recompiles", "graphs", "peak MB", "time s",
            "note"]
    rows = [head]
    for c in cases:
        lora = "-" if not c.lora else ("on" if c.lora == "applied" else c.lora.split(":")[0])
        if c.lora == "applied" and c.lora_effect_db is not None:
            lora += f" ({c.lora_effect_db:.0f} dB)"
        used = f"->{c.backend_used}" if c.backend_used and c.backend_used != c.backend else ""
        rows.append([c.model, c.level, c.backend + used,
                     c.status, _fmt(c.min_psnr_db), lora, _fmt(c.recompiles), _fmt(c.graphs_compiled),
                     _fmt(c.peak_mem_mb), _fmt(c.total_s), ("graphs " if c.cuda_graphs else "") + c.reason[:70]])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.1f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="a few cells on the tiny models, small sizes, 2 steps")
    parser.add_argument("--models", nargs="*", help="registry ids (default: tiny, small, and cached real ones)")
    parser.add_argument("--out", default="benchmarks/results/gpu_smoke.json")
    parser.add_argument("--budget-s", type=float, default=270.0, help="no case starts after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=90.0)
    parser.add_argument("--list", action="store_true", help="print the planned cases and exit")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    steps = 2 if args.quick else STEPS
    from engine.registry import get_spec
    from engine.testing import random_lora

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --quick", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.quick:
        cases = [Case(*c) for c in QUICK if not args.models or c[0] in args.models]
    else:
        from engine.loading import available_offline

        models = args.models or TINY + SMALL + [m for m in REAL if available_offline(get_spec(m))]
        cases = plan_cases(models, CELLS)
    models = list(dict.fromkeys(c.model for c in cases))
    if args.list:
        for c in cases:
            why = backend_missing(c.backend, device)
            print(f"{c.model:14} {c.level} {c.backend:12} {resolutions(c.model, args.quick)}"
                  + (f"  (skipped: {why})" if why else ""))
        return 0
    references: dict[str, dict[tuple[bool, int, int], Any]] = {m: {} for m in models}
    loras: dict[str, Path | None] = {}
    scratch = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    deadline = started + args.budget_s
    for case in cases:
        why = backend_missing(case.backend, device)
        if why is not None:
            case.status, case.reason = "skipped", why
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            case.status, case.reason = "skipped", f"time budget of {args.budget_s:.0f} s spent"
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {case.model} {case.level} {case.backend}", flush=True)
        try:
            limit = args.case_timeout_s * (2 if case.backend == "tensorrt" else 1)  # engines build per size
            with alarm(min(limit, remaining + 15)):
                if case.model not in loras:
                    try:
                        loras[case.model] = random_lora(case.model, scratch / f"{case.model}.safetensors")
                    except Exception as e:  # noqa: BLE001 - recorded; the cases run without LoRA
                        print(f"  no LoRA for {case.model}: {type(e).__name__}: {e}", flush=True)
                        loras[case.model] = None
                run_case(case, device, resolutions(case.model, args.quick), loras[case.model],
                         references[case.model], steps)
            judge(case)
        except CaseTimeout as e:
            case.status, case.reason = "timeout", str(e)
        except Exception as e:  # noqa: BLE001 - a crash is a result here
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            case.status, case.reason = "crashed", f"{type(e).__name__}: {first}"
            case.report.append({"name": "traceback", "status": "", "detail": traceback.format_exc()[-4000:]})
        print(f"  {case.status} {case.reason}", flush=True)

    shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started
    counts = {s: sum(c.status == s for c in cases) for s in ("ok", "failed", "crashed", "timeout", "skipped")}
    from engine.bench.env import environment, load_average

    env = environment(device)
    env["load_average_end"] = load_average()
    out = {"command": " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "device": _device_name(device), "environment": env, "versions": _versions(),
           "steps": steps, "seed": SEED, "thresholds_db": THRESHOLDS_DB, "lora_no_effect_db": LORA_NO_EFFECT_DB,
           "budget_s": args.budget_s, "case_timeout_s": args.case_timeout_s, "elapsed_s": round(elapsed, 1),
           "counts": counts, "cases": [dataclasses.asdict(c) for c in cases],
           "kernels": kernel_figures(device, args.quick), "cfg_parallel": cfg_parallel_check(device)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(out), indent=1, default=str) + "\n", encoding="utf-8")
    print()
    print(table(cases))
    print(f"\n{counts} in {elapsed:.0f} s on {out['device']}; JSON: {path}")
    print(f"CFG-parallel: {out['cfg_parallel']}")
    return 1 if counts["failed"] or counts["crashed"] or out["cfg_parallel"].get("status") == "failed" else 0


def cfg_parallel_check(device: torch.device) -> dict[str, Any]:
    """CFG-parallel (engine/scaleout/cfg_parallel.py) against the unsplit engine on tiny-sdxl at O1 fp32: on two
    GPUs when this host has them, else split onto the one device twice (the worker thread and cross-stream order
    still run; on CPU that is what the tests do), with the auto selection's verdict from the optimization report."""
    from engine import Engine

    if device.type == "cuda":
        index = device.index or 0
        others = [i for i in range(torch.cuda.device_count()) if i != index]
        devices = [f"cuda:{index}", f"cuda:{others[0]}" if others else f"cuda:{index}"]
    else:
        devices = [device.type, device.type]
    kw = dict(model="tiny-sdxl", prompt=PROMPT, seed=SEED, width=64, height=64, num_inference_steps=2,
              guidance_scale=5.0, num_images=2)
    out: dict[str, Any] = {"devices": devices}
    try:
        plain = Engine(device=str(device), opt_level="O1", compile_config={"dtype": "fp32", "parallel": "off"})
        split = Engine(device=str(device), opt_level="O1",
                       compile_config={"dtype": "fp32", "parallel_devices": devices})
        auto = Engine(device=str(device), opt_level="O1", compile_config={"dtype": "fp32"})
        report = auto.optimization_report("tiny-sdxl")
        out["auto"] = {"status": report.status("parallel"), "detail": " ".join(report.details("parallel"))}
        times = {}
        for name, engine in (("unsplit", plain), ("split", split)):
            engine.generate(**kw)  # warm-up
            t0 = time.perf_counter()
            images = engine.generate(**kw).images
            times[name] = round(time.perf_counter() - t0, 3)
            out[f"{name}_images"] = images
        out["psnr_db"] = min(psnr(a, b) for a, b in zip(out.pop("unsplit_images"), out.pop("split_images")))
        out["seconds"] = times
        out["status"] = "ok" if out["psnr_db"] >= THRESHOLDS_DB["O0"] else "failed"
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        out.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
    return out


def kernel_figures(device: torch.device, quick: bool) -> dict[str, Any]:
    """benchmarks/kernel_speed.py's figures (engine Triton kernels vs eager and inductor): GPU-only, else the reason."""
    spec = importlib.util.spec_from_file_location("engine_bench_kernels", Path(__file__).with_name("kernel_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        return module.run_kernel_benchmarks(device, quick=quick, iters=20, budget_s=60.0)
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _clean(value: Any) -> Any:
    """Strict JSON: infinite PSNR (identical images) as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _device_name(device: torch.device) -> str:
    from engine.bench.env import device_name

    if device.type == "cuda":
        return f"{device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return f"cpu ({device_name(device)}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "onnxruntime", "tensorrt", "peft"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


if __name__ == "__main__":
    sys.exit(main())
