"""The inputs of an image-conditioned job (img2img, inpaint, ControlNet), drawn from the job's seed and size so a
scenario downloads nothing and every preset, stock or engine, gets the same pixels: a smooth gradient with a few
shapes (the init image), a centred rectangle (the inpainting mask, white = repaint) and the edges of the init image
(the ControlNet's control image, white edges on black as a canny map is)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scenario import Job


def init_image(job: Job) -> Image.Image:
    """A left-to-right / top-to-bottom colour gradient with an ellipse and a rectangle placed by the seed."""
    rng = np.random.default_rng(job.seed)
    w, h = job.width, job.height
    x = np.linspace(0.0, 1.0, w)[None, :, None]
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    a, b = rng.uniform(0, 255, size=(2, 3))
    pixels = a * (1 - x) * (1 - y) + b * x * y + 60 * (x + y)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for shape in ("ellipse", "rectangle"):
        x0, y0 = rng.uniform(0.05, 0.5, size=2) * (w, h)
        x1, y1 = (x0, y0) + rng.uniform(0.25, 0.45, size=2) * (w, h)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        getattr(draw, shape)((x0, y0, x1, y1), fill=colour)
    return image


def mask_image(job: Job) -> Image.Image:
    """White (repaint) over the centre half of each side, black elsewhere ('L')."""
    mask = Image.new("L", (job.width, job.height), 0)
    ImageDraw.Draw(mask).rectangle((job.width // 4, job.height // 4, 3 * job.width // 4 - 1, 3 * job.height // 4 - 1),
                                   fill=255)
    return mask


def control_image(job: Job) -> Image.Image:
    """The init image's edges, thresholded to white on black, as RGB (the form canny ControlNets take)."""
    edges = np.asarray(init_image(job).convert("L").filter(ImageFilter.FIND_EDGES))
    return Image.fromarray(np.where(edges > 24, 255, 0).astype(np.uint8)).convert("RGB")


def engine_inputs(job: Job) -> dict[str, Any]:
    """`Engine.generate` keywords of the job's mode (none for text2img)."""
    kw: dict[str, Any] = {}
    if job.mode in ("img2img", "inpaint"):
        kw["image"] = init_image(job)
        if job.strength is not None:
            kw["strength"] = job.strength
    if job.mode == "inpaint":
        kw["mask_image"] = mask_image(job)
    if job.mode == "controlnet":
        kw["controlnets"] = [{"model": job.controlnet, "image": control_image(job),
                              "conditioning_scale": job.conditioning_scale}]
    return kw


def stock_inputs(job: Job, control_image_arg: str) -> dict[str, Any]:
    """The same inputs as the stock diffusers class's `__call__` keywords (`control_image_arg`: where its ControlNet
    image goes, from engine.pipelines.modes)."""
    kw = engine_inputs(job)
    for net in kw.pop("controlnets", []):
        kw[control_image_arg] = net["image"]
        kw["controlnet_conditioning_scale"] = net["conditioning_scale"]
    return kw
