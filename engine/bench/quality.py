"""Image quality against the baseline: PSNR and SSIM on 8-bit RGB, same seeds.

SSIM is written here (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per channel, averaged)
so the harness needs no scikit-image; with those constants it matches skimage's `structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)` on the valid (unpadded) region.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _stack(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) for i in images])


def psnr(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> float:
    """Peak signal-to-noise ratio in dB over all images; inf when identical."""
    xa, xb = _stack(a), _stack(b)
    if xa.shape != xb.shape:
        raise ValueError(f"image shapes differ: {xa.shape} vs {xb.shape}")
    mse = float(((xa - xb) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Sequence[Image.Image], b: Sequence[Image.Image], *, data_range: float = 255.0) -> float:
    """Mean structural similarity over images and channels; 1.0 when identical."""
    xa, xb = _stack(a), _stack(b)
    if xa.shape != xb.shape:
        raise ValueError(f"image shapes differ: {xa.shape} vs {xb.shape}")
    # (N, H, W, C) -> (N*C, 1, H, W): every channel is filtered alike.
    ta = torch.from_numpy(xa).permute(0, 3, 1, 2).reshape(-1, 1, *xa.shape[1:3])
    tb = torch.from_numpy(xb).permute(0, 3, 1, 2).reshape(-1, 1, *xb.shape[1:3])
    g = _gaussian_window()
    if min(ta.shape[-2:]) < g.numel():
        raise ValueError(f"images smaller than the {g.numel()}px SSIM window")

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(ta), blur(tb)
    var_a = blur(ta * ta) - mu_a**2
    var_b = blur(tb * tb) - mu_b**2
    cov = blur(ta * tb) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
