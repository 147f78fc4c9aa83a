"""Cold start of a full-size SDXL UNet (bf16, ~5.1 GB): our single-file loader against diffusers.

    python benchmarks/cold_start.py [--workdir /tmp/engine-coldstart] [--repeats 1]

Writes random bf16 weights once (reused when present) as an original-layout single file and as a diffusers folder,
then loads each in a fresh subprocess, one per method and repeat:
  ours             engine.loading.single_file.load_single_file_component (meta build + mmap + assign)
  from_single_file UNet2DConditionModel.from_single_file(path, config=configs/arch/sdxl, subfolder="unet")
  from_pretrained  UNet2DConditionModel.from_pretrained(<diffusers folder>, subfolder="unet")
By default the page cache is not dropped (the machine is shared): each file is first read once sequentially, which
is timed as the baseline, and every row reports how much of its file was resident before it ran (mincore).
--evict drops only the benchmark's own two files from the cache before each run (cold-disk numbers).
"load" is until the call returns; "ready" adds touching every page of every weight, which the first denoising step
would pay anyway if the load left pages on disk. The bytes read double as a checksum that the three methods loaded
identical weights.
Results: benchmarks/results/cold_start.{json,md} (cold_start_evicted.* with --evict).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "configs" / "arch" / "sdxl"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("ours", "from_single_file", "from_pretrained")
GIB = 1024**3


def single_file(workdir: Path) -> Path:
    return workdir / "sdxl_unet_bf16.safetensors"


def diffusers_dir(workdir: Path) -> Path:
    return workdir / "diffusers"


def diffusers_weights(workdir: Path) -> Path:
    return diffusers_dir(workdir) / "unet" / "diffusion_pytorch_model.safetensors"


# --------------------------------------------------------------------------------------------------- preparing


def prepare(workdir: Path) -> None:
    """Random bf16 weights, written both ways; runs in a child so its memory is gone before measuring."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.loading.original_layout import save_original_layout
    from engine.loading.single_file import build_meta_component

    unet = build_meta_component(ARCH, "unet").to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = single_file(workdir).with_suffix(".tmp")
    save_original_layout({"unet": unet}, "sdxl", tmp, only={"unet"})
    os.replace(tmp, single_file(workdir))
    assert isinstance(unet, UNet2DConditionModel)
    unet.save_pretrained(str(diffusers_dir(workdir) / "unet"), safe_serialization=True, max_shard_size="20GB")
    (diffusers_dir(workdir) / "model_index.json").write_text((ARCH / "model_index.json").read_text())


def ensure_files(workdir: Path) -> None:
    if single_file(workdir).is_file() and diffusers_weights(workdir).is_file():
        return
    print(f"writing random bf16 SDXL UNet files under {workdir} ...", flush=True)
    subprocess.run([sys.executable, __file__, "--prepare", "--workdir", str(workdir)], check=True)


# ------------------------------------------------------------------------------------------------- page cache


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a read-only mapping)."""
    size = path.stat().st_size
    if size == 0 or platform.system() != "Linux":
        return float("nan")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return float("nan")
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)


def evict(path: Path) -> None:
    """Drop this one file's clean pages from the page cache (POSIX_FADV_DONTNEED); other files are untouched."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_once(path: Path, cold: bool = False) -> dict[str, Any]:
    if cold:
        evict(path)
    before = resident_fraction(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 * 1024 * 1024)
        while f.readinto(buf):
            pass
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    return {"file": path.name, "bytes": size, "seconds": seconds, "gib_per_s": size / GIB / seconds,
            "resident_before": before}


# --------------------------------------------------------------------------------------------------- measuring


class MemorySampler(threading.Thread):
    """Peak RssAnon (copies in process memory) and RssFile (mapped file pages) from /proc/self/status."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._done = threading.Event()

    def _read(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
        except OSError:
            pass

    def run(self) -> None:
        while not self._done.is_set():
            self._read()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self._read()
        return self.peak


def touch_every_page(module: Any) -> int:
    """Read one byte of every 4 KiB page of every weight (faults in what an mmap load left on disk), returning their
    sum: a cheap checksum that the methods loaded the same bytes."""
    import torch

    total = 0
    with torch.no_grad():
        for t in module.state_dict().values():
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            total += int(flat[::4096].sum(dtype=torch.int64))
    return total


def load(method: str, workdir: Path) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    if method == "ours":
        from engine.loading.single_file import load_single_file_component

        return load_single_file_component(single_file(workdir), "unet", ARCH, torch_dtype=torch.bfloat16)
    if method == "from_single_file":
        return UNet2DConditionModel.from_single_file(str(single_file(workdir)), config=str(ARCH), subfolder="unet",
                                                     local_files_only=True, torch_dtype=torch.bfloat16)
    if method == "from_pretrained":
        return UNet2DConditionModel.from_pretrained(str(diffusers_dir(workdir)), subfolder="unet",
                                                    local_files_only=True, torch_dtype=torch.bfloat16)
    raise ValueError(method)


def measure(method: str, workdir: Path) -> dict[str, Any]:
    """Runs in a fresh interpreter: imports are timed apart from the load."""
    t0 = time.perf_counter()
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401  (resolves diffusers' lazy import here, not in the load)

    import engine.loading.single_file  # noqa: F401

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    imports = time.perf_counter() - t0
    path = single_file(workdir) if method != "from_pretrained" else diffusers_weights(workdir)
    resident = resident_fraction(path)
    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    unet = load(method, workdir)
    loaded = time.perf_counter() - start
    checksum = touch_every_page(unet)
    ready = time.perf_counter() - start
    peak = sampler.stop()
    dtypes = sorted({str(p.dtype) for p in unet.parameters()})
    return {
        "method": method, "file": path.name, "resident_before": resident, "import_s": imports, "load_s": loaded,
        "ready_s": ready, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_anon_bytes": peak["RssAnon"], "peak_rss_file_bytes": peak["RssFile"],
        "params": sum(p.numel() for p in unet.parameters()), "dtypes": dtypes, "checksum": checksum,
    }


def run_child(method: str, workdir: Path, cold: bool = False) -> dict[str, Any]:
    if cold:
        for path in (single_file(workdir), diffusers_weights(workdir)):
            evict(path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--measure", method, "--workdir", str(workdir)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Cold start: SDXL UNet, bf16, random weights",
        "",
        f"{report['machine']}; "
        + ("each file evicted from the page cache (fadvise DONTNEED) before each run" if report["evicted"]
           else "page cache not dropped (shared machine)")
        + ". Files: "
        + ", ".join(f"{r['file']} {r['bytes'] / GIB:.2f} GiB" for r in report["read_once"]),
        "",
        "| baseline | seconds | GiB/s | resident before |",
        "|---|---:|---:|---:|",
    ]
    for r in report["read_once"]:
        lines.append(f"| read {r['file']} once | {r['seconds']:.2f} | {r['gib_per_s']:.2f} | "
                     f"{r['resident_before']:.0%} |")
    lines += [
        "",
        "| method | load s | ready s (load + touch all weights) | peak RSS GiB | peak anon GiB | peak file-mapped GiB "
        "| resident before | checksum |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['method']} | {r['load_s']:.2f} | {r['ready_s']:.2f} | {r['peak_rss_bytes'] / GIB:.2f} | "
            f"{r['peak_rss_anon_bytes'] / GIB:.2f} | {r['peak_rss_file_bytes'] / GIB:.2f} | "
            f"{r['resident_before']:.0%} | {r['checksum']} |"
        )
    lines += ["", "load: until the call returns; ready: plus touching every 4 KiB page of every weight.",
              "anon: memory the process allocated (copies); file-mapped: page-cache pages mapped from the file.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/engine-coldstart"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--evict", action="store_true",
                        help="evict the benchmark's own files from the page cache before each run (cold numbers); "
                             "results go to cold_start_evicted.*")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.prepare:
        prepare(args.workdir)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.workdir)))
        return
    ensure_files(args.workdir)
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "evicted": args.evict,
        "read_once": [read_once(single_file(args.workdir), args.evict),
                      read_once(diffusers_weights(args.workdir), args.evict)],
        "runs": [],
    }
    for _ in range(args.repeats):
        for method in args.methods:
            result = run_child(method, args.workdir, args.evict)
            print(json.dumps(result), flush=True)
            report["runs"].append(result)
    if len({r["checksum"] for r in report["runs"]}) > 1:
        print("warning: the methods loaded different weights (checksums differ)", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "cold_start_evicted" if args.evict else "cold_start"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
