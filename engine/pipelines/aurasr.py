"""AuraSR 4x upscaling of a whole image: pad, cut into 64x64 tiles, run them in batches, stitch (optionally a second,
half-tile-offset pass blended in), crop.

Semantics follow the reference `upscale_4x` / `upscale_4x_overlapped`, with these choices of our own:
- everything after the model (stitching, blending, cropping, the uint8 conversion) runs on the device in fp32;
  each batch goes straight into the canvas (no buffer of all tile outputs; blend weights are one tile-sized mask),
  and the image crosses to the host once, at the end;
- the random draws follow the reference's schedule (per chunk of 8 tiles: style noise, input noise, and the style
  noise its generator draws and discards), whatever the compute batch size, so one seed gives one image at any
  batch size and matches the reference on the CPU;
- timings: "preprocess" (conversion, padding), "tiles" (model and placement), "stitch" (crop, uint8, alpha),
  "total"; `last_tile_count` / `last_batch_tiles` describe the last call;
- progress: `tile_callback(done, total)` after each batch, counting the tiles of both passes (default: the listener
  installed by `engine.progress.reporting_tiles`, if any);
- float to uint8 rounds (the reference truncates: up to one level darker);
- images narrower than the padding reflect repeatedly (a 1-pixel side replicates), alpha is resized classically
  and re-attached, palette / grayscale / 16-bit inputs are converted to RGB first.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models.aurasr import AuraSRGenerator, PrecomputedStyles
from ..progress import TileCallback, tile_listener
from .base import StageTimer, seeded_generator

NOISE_CHUNK = 8  # the reference's default max_batch_size: the unit in which it draws noise
MAX_AUTO_BATCH = 32  # beyond this a larger batch buys no throughput, only memory
ALPHA_RESAMPLE = Image.Resampling.BICUBIC


class AuraSRPipeline:
    """Whole-image upscaling with an AuraSR generator. The model is moved/cast in place to `device`/`dtype`.
    `max_batch_tiles=None`: tiles per batch from free memory (CUDA: free device memory; CPU: available RAM)."""

    def __init__(
        self,
        model: AuraSRGenerator,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tiles: int | None = None,
    ) -> None:
        if max_batch_tiles is not None and max_batch_tiles < 1:
            raise ValueError("max_batch_tiles must be >= 1")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.max_batch_tiles = max_batch_tiles
        self.last_tile_count = 0
        self.last_batch_tiles = 0

    @property
    def scale(self) -> int:
        return self.model.scale

    # public --------------------------------------------------------------------------------------------------

    def upscale(
        self,
        image: Image.Image,
        *,
        overlapping_tiles: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        shared_style: bool = False,
        tile_callback: TileCallback | None = None,
    ) -> tuple[Image.Image, dict[str, float]]:
        """Upscale by 4. `seed` (a CPU generator) or `generator`; neither: the global torch RNG, as the reference.
        `shared_style`: one style for every tile (static convolutions: faster, seam-free styles; not the reference's
        per-tile draws)."""
        timer = StageTimer(self.device)
        start = time.perf_counter()
        gen = _pick_generator(seed, generator)
        with torch.inference_mode():
            with timer.stage("preprocess"):
                rgb, alpha = split_alpha(image)
                pixels = image_to_tensor(rgb, self.device)
            canvas = self.upscale_tensor(
                pixels, overlapping_tiles=overlapping_tiles, generator=gen, shared_style=shared_style, timer=timer,
                tile_callback=tile_callback,
            )
            with timer.stage("stitch"):
                out = tensor_to_image(canvas)
                if alpha is not None:
                    out.putalpha(alpha.resize(out.size, ALPHA_RESAMPLE))
        timer.timings["total"] = time.perf_counter() - start
        return out, timer.timings

    def upscale_tensor(
        self,
        pixels: Tensor,
        *,
        overlapping_tiles: bool = False,
        generator: torch.Generator | None = None,
        shared_style: bool = False,
        timer: StageTimer | None = None,
        tile_callback: TileCallback | None = None,
    ) -> Tensor:
        """`[3, H, W]` in [0, 1] -> `[3, 4H, 4W]` fp32 on the device (tiles clamped to [0, 1] before stitching).
        Each batch is placed into the canvas as it comes out, so no buffer of all tile outputs exists."""
        timer = timer or StageTimer(self.device)
        tile, out_tile = self.model.tile_size, self.model.tile_size * self.scale
        h, w = pixels.shape[-2:]
        gen = generator if generator is not None else torch.default_generator
        with torch.inference_mode():
            with timer.stage("preprocess"):
                padded = pad_reflect(pixels.to(self.device, torch.float32), 0, -w % tile, 0, -h % tile)
                passes = [padded]
                if overlapping_tiles:  # the second pass is offset by half a tile
                    passes.append(pad_reflect(padded, tile // 2, tile // 2, tile // 2, tile // 2))
                canvas = torch.empty(3, padded.shape[-2] * self.scale, padded.shape[-1] * self.scale,
                                     device=self.device)
                weight = blend_weights(out_tile, self.device) if overlapping_tiles else None
            report = tile_callback if tile_callback is not None else tile_listener()
            total = sum((p.shape[-2] // tile) * (p.shape[-1] // tile) for p in passes)
            with timer.stage("tiles"):
                shared = self._shared_styles(gen) if shared_style else None
                self.last_tile_count = 0
                for index, image in enumerate(passes):
                    grid_w = image.shape[-1] // tile
                    offset = out_tile // 2 if index else 0

                    def place(first: int, outputs: Tensor, grid_w: int = grid_w, offset: int = offset,
                              accumulate: bool = index > 0) -> None:
                        _place(canvas, outputs, first, grid_w, out_tile, offset=offset, weight=weight,
                               accumulate=accumulate)

                    def done(count: int, before: int = self.last_tile_count) -> None:
                        if report is not None:
                            report(before + count, total)

                    self.last_tile_count += self._run_tiles(cut_tiles(image, tile), gen, shared, place, done)
            with timer.stage("stitch"):
                canvas = canvas[:, : h * self.scale, : w * self.scale]
        return canvas

    # tiles ---------------------------------------------------------------------------------------------------

    def _shared_styles(self, gen: torch.Generator) -> PrecomputedStyles:
        noise = _randn((1, self.model.noise_dim), gen, self.device)
        return self.model.precompute_styles(noise)

    def _run_tiles(
        self,
        tiles: Tensor,
        gen: torch.Generator,
        shared: PrecomputedStyles | None,
        place: Callable[[int, Tensor], None],
        done: Callable[[int], None] | None = None,
    ) -> int:
        """Run `tiles` in batches; hand each batch's fp32 outputs, clamped to [0, 1], to `place(first_index, out)`,
        then the number of tiles done so far to `done`.
        The noise for the whole pass is drawn first, in the reference's chunks."""
        style_noise, input_noise = self._draw_noise(tiles.shape, gen, shared is not None)
        batch = self.max_batch_tiles or auto_batch_tiles(self.model, self.device, self.dtype, shared is not None)
        self.last_batch_tiles = batch
        fmt = torch.channels_last if self.model.is_channels_last else torch.contiguous_format
        for i in range(0, tiles.shape[0], batch):
            j = min(i + batch, tiles.shape[0])
            result = self.model(
                tiles[i:j].contiguous(memory_format=fmt),
                None if style_noise is None else style_noise[i:j],
                precomputed=shared,
                input_noise=input_noise[i:j],
            )
            place(i, result.float().clamp_(0, 1))
            if done is not None:
                done(j)
        return tiles.shape[0]

    def _draw_noise(
        self, shape: torch.Size, gen: torch.Generator, shared: bool
    ) -> tuple[Tensor | None, Tensor]:
        """Per chunk of NOISE_CHUNK tiles, as the reference draws: style noise [b, D], input noise [b, 3, T, T],
        and a style-sized draw its generator makes and discards. Shared style: input noise only."""
        styles, inputs = [], []
        for i in range(0, shape[0], NOISE_CHUNK):
            b = min(NOISE_CHUNK, shape[0] - i)
            if not shared:
                styles.append(_randn((b, self.model.noise_dim), gen, self.device))
            inputs.append(_randn((b, *shape[1:]), gen, self.device))
            if not shared:
                _randn((b, self.model.noise_dim), gen, self.device)
        return (torch.cat(styles) if styles else None), torch.cat(inputs)


# -------------------------------------------------------------------------------------------------- helpers


def _pick_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    return seeded_generator(seed) if seed is not None else generator


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    """fp32 normal noise drawn on the generator's own device, then moved: a CPU seed means the same on any device."""
    return torch.randn(shape, generator=gen, device=gen.device).to(device)


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB to upscale, and the alpha channel (if any) to resize separately."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit_gray(image)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if {"A", "a"} & set(image.getbands()):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return (image if image.mode == "RGB" else image.convert("RGB")), None


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits (16-bit range scaled, floats taken as [0, 1] when they fit)."""
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    elif arr.size and arr.max() > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def image_to_tensor(image: Image.Image, device: torch.device) -> Tensor:
    """RGB PIL -> `[3, H, W]` fp32 in [0, 1] on `device` (uint8 crosses to the device, the division happens there)."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).to(device).permute(2, 0, 1).float().div_(255)


def tensor_to_image(canvas: Tensor) -> Image.Image:
    """`[3, H, W]` fp32 in [0, 1] -> RGB PIL, rounded on the device; one transfer to the host."""
    pixels = canvas.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def pad_reflect(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Reflect-pad `[C, H, W]`; a pad wider than the image reflects again, a side of one pixel replicates."""
    x = x.unsqueeze(0)
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if not any(step):
            x = F.pad(x, (left, right, top, bottom), mode="replicate")
            break
        x = F.pad(x, tuple(step), mode="reflect")
        left, right, top, bottom = (p - s for p, s in zip((left, right, top, bottom), step))
    return x.squeeze(0)


def cut_tiles(x: Tensor, tile: int) -> Tensor:
    """`[C, H, W]` (multiples of `tile`) -> `[N, C, tile, tile]`, row-major like the reference."""
    c, h, w = x.shape
    return x.reshape(c, h // tile, tile, w // tile, tile).permute(1, 3, 0, 2, 4).reshape(-1, c, tile, tile)


def _place(
    canvas: Tensor,
    tiles: Tensor,
    first: int,
    grid_w: int,
    size: int,
    *,
    offset: int,
    weight: Tensor | None,
    accumulate: bool,
) -> None:
    """Write (or add) tile `first + k` at grid row (first + k) // grid_w, column (first + k) % grid_w, shifted
    up-left by `offset` and clipped to the canvas; optionally multiplied by the per-tile `weight`."""
    height, width = canvas.shape[-2:]
    for k in range(tiles.shape[0]):
        y0, x0 = ((first + k) // grid_w) * size - offset, ((first + k) % grid_w) * size - offset
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + size, height), min(x0 + size, width)
        if ys >= ye or xs >= xe:
            continue
        part = tiles[k, :, ys - y0 : ye - y0, xs - x0 : xe - x0]
        if weight is not None:
            part = part * weight[ys - y0 : ye - y0, xs - x0 : xe - x0]
        if accumulate:
            canvas[:, ys:ye, xs:xe] += part
        else:
            canvas[:, ys:ye, xs:xe] = part


def centre_weights(size: int, device: torch.device) -> Tensor:
    """The reference's tile mask: a Gaussian of the distance from the centre (sigma 0.5 on [-1, 1]), to the 8th
    power, peak 1; nearly zero at the corners."""
    axis = torch.linspace(-1, 1, size, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    dist = torch.sqrt(x * x + y * y)
    weights = torch.exp(-(dist**2) / (2.0 * 0.5**2)) ** 8
    return weights / weights.max()


def blend_weights(size: int, device: torch.device) -> Tensor:
    """The normalised per-tile weight, the same for both passes: they are offset by half a tile, so under every
    tile of one pass the other pass's mask is this mask rolled by half a tile, and each tile gets own/(own + other).
    No image-sized weight maps are needed."""
    own = centre_weights(size, device)
    other = torch.roll(own, shifts=(size // 2, size // 2), dims=(0, 1))
    return own / (other + own)


def auto_batch_tiles(model: AuraSRGenerator, device: torch.device, dtype: torch.dtype, shared_style: bool) -> int:
    """Tiles per batch from free memory (half of it), using a coarse per-tile estimate."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    per_tile = estimate_tile_bytes(model, dtype, shared_style)
    return int(max(1, min(MAX_AUTO_BATCH, (free // 2) // per_tile)))


def estimate_tile_bytes(model: AuraSRGenerator, dtype: torch.dtype, shared_style: bool) -> int:
    """Peak bytes one tile adds: ~8 live feature maps of the widest level, the skips, the fp32 output, and, with
    per-tile styles, that tile's fp32 kernels of the largest layer (mix, scale, demodulate, cast)."""
    cfg = model.config
    itemsize = torch.finfo(dtype).bits // 8
    side = cfg.input_image_size
    levels = [(d, side // 2**i) for i, d in enumerate(cfg.down_dims[:-1])]
    ups = [(d * 2, cfg.image_size // 2 ** (len(cfg.up_dims) - 2 - i)) for i, d in enumerate(cfg.up_dims[:-1])]
    widest = max(c * s * s for c, s in levels + ups)
    skips = sum(6 * c * s * s for c, s in levels)
    kernels = 0 if shared_style else 16 * max(c.weights[0].numel() for c in model.modulated_convs())
    output = 4 * 3 * cfg.image_size**2
    return itemsize * (8 * widest + skips) + kernels + output
