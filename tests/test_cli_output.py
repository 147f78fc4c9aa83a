"""The CLI's terminal: no library noise, `--json` for scripts, `--quiet`, progress bars only on a terminal; and
`import engine` leaves optional heavy libraries (torchao) unimported."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import LIBRARY_NOISE, _DropMessages
from engine.progress import StepBar, TileBar, interactive, reporting_tiles, tile_listener

ROOT = Path(__file__).resolve().parent.parent
# What the tiny model's run printed before the CLI filtered library noise (torchao comes in through diffusers).
NOISE = ("torchao", "_pytree", "Unable to import", "Enum subclass", "triton")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _generate(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _run("generate", "--model", "tiny-sdxl", "--prompt", "a lighthouse", "--steps", "2", "--seed", "7",
                "--out", str(tmp_path / "o.png"), *extra)


# ----------------------------------------------------------------------------------------------- subprocesses


def test_import_engine_does_not_import_torchao() -> None:
    code = "import sys, engine, engine.cli; assert 'torchao' not in sys.modules, 'torchao imported'; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_plain_run_prints_no_library_noise(tmp_path: Path) -> None:
    proc = _generate(tmp_path)
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr
    assert "seed 7; 128x128, 2 steps" in proc.stdout
    assert f"wrote {tmp_path / 'o.png'}" in proc.stdout
    assert "\r" not in proc.stderr and "step/s" not in proc.stderr  # not a terminal: no progress bar


def test_json_is_one_parseable_object(tmp_path: Path) -> None:
    proc = _generate(tmp_path, "--json", "--num-images", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is the object and nothing else
    assert out["command"] == "generate" and out["model"] == "tiny-sdxl"
    assert out["paths"] == [str(tmp_path / "o-0.png"), str(tmp_path / "o-1.png")]
    assert all(Path(p).is_file() for p in out["paths"])
    assert out["seed"] == 7 and (out["width"], out["height"]) == (128, 128)
    assert out["num_images"] == 2 and out["num_inference_steps"] == 2
    assert {"encode", "denoise", "decode", "total"} <= set(out["timings"])
    assert out["load_time"] > 0
    report = out["report"]
    assert {"config_hash", "device", "passes", "memory_plan"} <= set(report)
    assert {p["name"] for p in report["passes"]} >= {"dtype", "compile"}
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    proc = _generate(tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""
    assert (tmp_path / "o.png").is_file()


def test_errors_still_show_under_quiet(tmp_path: Path) -> None:
    proc = _run("generate", "--model", "no-such-model-xyz", "--prompt", "x", "--quiet", "--out",
                str(tmp_path / "o.png"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error:") and "no-such-model-xyz" in proc.stderr


def test_upscale_json(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (20, 12), (200, 30, 40)).save(tmp_path / "in.png")
    proc = _run("upscale", "--model", "tiny-aura-sr", "--image", str(tmp_path / "in.png"), "--seed", "3",
                "--out", str(tmp_path / "up.png"), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["command"] == "upscale" and out["paths"] == [str(tmp_path / "up.png")]
    assert (out["width"], out["height"], out["seed"], out["tiles"]) == (80, 48, 3, 1)
    assert "tiles" in out["timings"] and out["report"]["device"] == "cpu"
    assert proc.stderr == ""


# ----------------------------------------------------------------------------------------------- in process


class _FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_interactive_follows_the_stream() -> None:
    assert interactive(_FakeStream(tty=True))
    assert not interactive(_FakeStream(tty=False))
    closed = io.StringIO()
    closed.close()
    assert not interactive(closed)  # isatty on a closed stream raises ValueError


@pytest.mark.parametrize("tty", [True, False])
def test_step_bar_counts_steps(tty: bool) -> None:
    stream = _FakeStream(tty)
    bar = StepBar(enabled=interactive(stream), file=stream)
    for i in range(5):
        bar(i, 5, None)
    assert (bar.count, bar.total) == (5, 5)
    shown = stream.getvalue()
    if tty:
        assert "denoise" in shown and "/5 " in shown  # drawn (then cleared: leave=False)
    else:
        assert shown == ""
    # A second run through the same callback (a retry after a memory fallback) starts a new count.
    for i in range(3):
        bar(i, 3, None)
    assert (bar.count, bar.total) == (3, 3)
    bar.close()


def test_step_bar_through_the_engine(engine) -> None:  # noqa: ANN001 - the session engine fixture
    bar = StepBar(enabled=False)
    seen = []
    engine.generate(model="tiny-sdxl", prompt="x", num_inference_steps=3, seed=1,
                    step_callback=lambda i, n, latents: (seen.append((i, n)), bar(i, n, latents)))
    assert seen == [(0, 3), (1, 3), (2, 3)]
    assert bar.count == 3


def test_aurasr_reports_tiles_of_both_passes() -> None:
    import torch

    from engine.loading.aurasr import build_tiny_aurasr
    from engine.pipelines.aurasr import AuraSRPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: thread hand-offs cost more than they save
    try:
        _, model = build_tiny_aurasr()
        pipe = AuraSRPipeline(model, torch.device("cpu"), torch.float32, max_batch_tiles=2)
        _check_tiles(pipe)
    finally:
        torch.set_num_threads(threads)


def _check_tiles(pipe) -> None:  # noqa: ANN001
    from PIL import Image

    image = Image.new("RGB", (20, 20), (10, 120, 200))
    calls: list[tuple[int, int]] = []
    pipe.upscale(image, seed=0, overlapping_tiles=True, tile_callback=lambda done, total: calls.append((done, total)))
    # One 64px tile, then the half-tile-offset pass over 2x2 tiles in batches of two.
    assert calls == [(1, 5), (3, 5), (5, 5)] and pipe.last_tile_count == 5

    stream = _FakeStream(tty=True)
    with TileBar(enabled=True, file=stream) as tiles, reporting_tiles(tiles):
        assert tile_listener() is tiles
        pipe.upscale(image, seed=0)
    assert tile_listener() is None
    assert (tiles.count, tiles.total) == (1, 1) and "tiles" in stream.getvalue()


def test_library_noise_patterns_match_what_libraries_print() -> None:
    samples = {
        "torchao": "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
                   "load this library: /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
        "torchao.kernel.intmm": "Warning: Detected no triton, on systems without Triton certain kernels will not "
                                "work",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                               "torch.compile as an opaque value type. Calling register_constant() on Enum "
                               "subclasses is deprecated and will be an error in a future release.",
        "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may "
                                                          "affect loading checkpoints serialized with `torchao`",
        "transformers.tokenization_utils_base": "Token indices sequence length is longer than the specified maximum "
                                                "sequence length for this model (442 > 77). Running this sequence "
                                                "through the model will result in indexing errors",
    }
    assert set(samples) == {name for name, _ in LIBRARY_NOISE}
    for name, pattern in LIBRARY_NOISE:
        drop = _DropMessages(pattern)
        noisy = logging.LogRecord(name, logging.WARNING, __file__, 1, samples[name], None, None)
        other = logging.LogRecord(name, logging.WARNING, __file__, 1, "something the user should see", None, None)
        assert not drop.filter(noisy) and drop.filter(other)
