"""Upscale jobs in the harness: the input image a job draws, the reference `aura-sr` package as the baseline, and the
engine's upscaler as a preset. Stages: preprocess | tiles | stitch (TileProbe on stock, the pipeline's own timers on
ours).

The baseline is fal's own package on the weights our loader read, seeded the same way (it draws from the global
torch RNG, ours from a CPU generator with the same seed, in the same order), so O0 reproduces it within one level
(it truncates to uint8, we round). The package imports torchvision for three small helpers, and torchvision does
not install beside a CPU-only torch: those three are provided here for the import alone.
"""

from __future__ import annotations

import importlib.machinery
import sys
import time
import types
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .metrics import FlopCount, TileProbe, count_flops
from .scenario import Job


def input_image(job: Job) -> Image.Image:
    """A deterministic photo-like input of the job's size: smooth colour fields (bicubic from a coarse grid) plus
    fine texture, drawn from the job's seed. Pure noise would make every upscaler look alike."""
    gen = torch.Generator().manual_seed(job.seed)
    coarse = torch.rand(1, 3, max(2, job.height // 16), max(2, job.width // 16), generator=gen)
    smooth = F.interpolate(coarse, size=(job.height, job.width), mode="bicubic", align_corners=False)
    texture = torch.rand(1, 3, job.height, job.width, generator=gen)
    pixels = (0.85 * smooth.clamp(0, 1) + 0.15 * texture).clamp(0, 1)
    return Image.fromarray((pixels[0] * 255).round().byte().permute(1, 2, 0).numpy())


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    """`transforms.ToTensor`, `transforms.ToPILImage` and `utils.save_image`, the only torchvision names aura_sr
    uses, with torchvision's semantics (ToPILImage truncates, as `mul(255).byte()` does)."""

    class ToTensor:
        def __call__(self, image: Image.Image) -> torch.Tensor:
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)

    class ToPILImage:
        def __call__(self, tensor: torch.Tensor) -> Image.Image:
            return Image.fromarray(tensor.mul(255).byte().permute(1, 2, 0).cpu().numpy())

    names = ("torchvision", "torchvision.transforms", "torchvision.utils")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["torchvision.transforms"].ToTensor = ToTensor  # type: ignore[attr-defined]
    modules["torchvision.transforms"].ToPILImage = ToPILImage  # type: ignore[attr-defined]
    modules["torchvision.utils"].save_image = lambda *a, **k: None  # type: ignore[attr-defined]
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision"].utils = modules["torchvision.utils"]  # type: ignore[attr-defined]
    return modules


def import_reference() -> types.ModuleType:
    """The `aura_sr` module; ImportError (with what to install) if the package is missing."""
    if "aura_sr" in sys.modules:
        return sys.modules["aura_sr"]
    try:
        import einops  # noqa: F401  (a real dependency of aura_sr: imported outside the patch)
    except ImportError as e:
        raise ImportError("the reference AuraSR needs einops (pip install einops)") from e
    patch = {} if _has_torchvision() else _torchvision_stand_ins()
    with mock.patch.dict(sys.modules, patch):
        try:
            import aura_sr
        except ImportError as e:
            raise ImportError("the reference AuraSR package is not installed "
                              "(pip install --no-deps aura-sr==0.0.4)") from e
    return aura_sr


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


class ReferenceUpscaler:
    """The stock runner of an upscale job: `aura_sr.AuraSR` holding the weights our loader read for `model`. The
    package feeds fp32 tiles whatever its weights' dtype, so its bf16 run is the one a user would make: fp32 weights
    under `torch.autocast(dtype=bfloat16)`."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32):
        from ..loading.aurasr import load_aurasr

        aura_sr = import_reference()
        network = load_aurasr(model)
        self.device = device
        self.reference = aura_sr.AuraSR(network.config.to_dict(), device=str(device))
        self.reference.upsampler.load_state_dict(network.state_dict(), strict=True)
        self.reference.upsampler.eval()
        self.probe = TileProbe(self.reference.upsampler, device)
        self._inputs: dict[tuple[Any, ...], Image.Image] = {}
        self.dtype = dtype
        self._autocast = dtype != torch.float32

    def _upscale(self, job: Job) -> list[Image.Image]:
        if job.shared_style:
            raise ValueError("the reference aura-sr has no shared-style mode (one style per tile only)")
        image = self._inputs.setdefault(job.key(), input_image(job))
        torch.manual_seed(job.seed)  # the reference draws its noise from the global RNG
        run = self.reference.upscale_4x_overlapped if job.overlapping_tiles else self.reference.upscale_4x
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
            return [run(image)]

    def call(self, job: Job) -> Any:
        def run() -> tuple[list[Image.Image], dict[str, float]]:
            self.probe.reset()
            start = time.perf_counter()
            images = self._upscale(job)
            end = time.perf_counter()
            return images, self.probe.split(start, end)[0]
        return run

    def count(self, job: Job) -> tuple[FlopCount, list[Image.Image]]:
        return count_flops(lambda: self._upscale(job), self.probe)

    def close(self) -> None:
        self.probe.remove()
        del self.reference


def upscale_kwargs(job: Job) -> dict[str, Any]:
    return dict(model=job.model, overlapping_tiles=job.overlapping_tiles, seed=job.seed,
                shared_style=job.shared_style)
