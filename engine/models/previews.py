"""Cheap previews of in-flight latents: a fixed linear map from latent channels to RGB, per family.

Running the VAE on every step would cost as much as a step on small models; a 4x3 (or 16x3) matrix costs nothing and
is what progress UIs show. The coefficients are the widely used least-squares fits of each VAE's decoded colour to
its latent channels (published numbers). A latent whose channel count matches no table (the tiny test models) falls
back to its first three channels, normalised per image: still a picture of the latent, just not in true colour.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

# (channels x 3) weights and a 3-vector bias, applied to latents in the denoiser's (scaled) space.
_FACTORS: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd15": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.6410]],
        [0.1084, -0.0175, -0.0011],
    ),
    "flux": (
        [
            [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
            [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
            [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
}


def unpack_flux_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, L, C*4) packed 2x2 patches -> (B, C, H, W). The grid follows the requested aspect ratio."""
    b, length, packed = latents.shape
    h2 = max(1, round(math.sqrt(length * height / width)))
    w2 = length // h2
    if h2 * w2 != length:  # aspect rounding: fall back to the factorisation closest to the request
        h2 = next(h for h in range(h2, 0, -1) if length % h == 0)
        w2 = length // h2
    c = packed // 4
    x = latents.reshape(b, h2, w2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h2 * 2, w2 * 2)


def latents_to_rgb(latents: torch.Tensor, family: str) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, 3, H, W) floats in [0, 1]."""
    x = latents.detach().float().cpu()
    table = _FACTORS.get(family)
    if table is not None and len(table[0]) == x.shape[1]:
        weight = torch.tensor(table[0])
        bias = torch.tensor(table[1])
        rgb = torch.einsum("bchw,cr->brhw", x, weight) + bias[None, :, None, None]
        return ((rgb + 1) / 2).clamp(0, 1)
    rgb = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo = rgb.amin(dim=(1, 2, 3), keepdim=True)
    hi = rgb.amax(dim=(1, 2, 3), keepdim=True)
    return (rgb - lo) / (hi - lo).clamp_min(1e-6)


def preview_image(latents: torch.Tensor, family: str, width: int, height: int, max_side: int = 128) -> Image.Image:
    """The first image of the batch as a small RGB picture (at most `max_side` on the long side)."""
    if latents.ndim == 3:
        latents = unpack_flux_latents(latents, width, height)
    rgb = latents_to_rgb(latents[:1], family)[0]
    array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    scale = min(1.0, max_side / max(width, height)) if max(width, height) > 0 else 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)
