"""Turn a request's image argument into a fully decoded PIL image, or an InvalidRequestError that says why not.

Accepted: a PIL image, a numpy array (HW or HWC; uint8, uint16, bool or float in [0, 1]), raw bytes, a local path,
an http(s) URL, a data URI. Everything from outside is treated as hostile:
- the format is sniffed from the first bytes (never the Content-Type header or the file name), and PIL may only use
  the decoder for that format, so an upload cannot reach an unexpected plugin;
- the pixel count is checked from the header, before any pixel is decoded; the full decode is forced (`load()`),
  so a truncated file fails here and not halfway through a job;
- URLs go through the one SSRF guard, engine/net.py: only http and https; every address of the host must be public
  (unless allowed); the connection goes to the checked address (no second lookup for a rebinding DNS server);
  redirects are re-checked hop by hop; the body is limited while it streams; no proxy from the environment.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import net
from .errors import InvalidRequestError

DEFAULT_MAX_PIXELS = 4096 * 4096  # the one input-image limit (API, upscaler, fal endpoints)
DEFAULT_MAX_BYTES = 50_000_000
SUPPORTED = "PNG, JPEG, WEBP, GIF, BMP, TIFF"
ORIENTATION_TAG = 0x0112


def load_image_input(
    value: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_private_urls: bool = False,
    timeout_s: float = 20,
    allow_local_paths: bool = True,
    field: str | None = None,
) -> Image.Image:
    """Decode `value` into a PIL image. `field` names the request field in errors (default: "image_url" for
    strings, "image" for objects). Servers taking input from untrusted callers should pass allow_local_paths=False."""
    if isinstance(value, Image.Image):
        return _check_pil(value, field or "image", max_pixels)
    if isinstance(value, np.ndarray):
        return _from_array(value, field or "image", max_pixels)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _check_size(len(data), max_bytes, field or "image")
        return decode_image_bytes(data, field=field or "image", max_pixels=max_pixels)
    if isinstance(value, os.PathLike):
        return _from_path(Path(value), field or "image", max_pixels, max_bytes, allow_local_paths)
    if isinstance(value, str):
        return _from_string(value.strip(), field or "image_url", max_pixels, max_bytes, allow_private_urls,
                            timeout_s, allow_local_paths)
    raise InvalidRequestError(field or "image", f"unsupported input type {type(value).__name__}",
                              "PIL image, numpy array, bytes, path, http(s) URL, data URI")


def _from_string(text: str, field: str, max_pixels: int, max_bytes: int, allow_private: bool, timeout_s: float,
                 allow_local_paths: bool) -> Image.Image:
    if not text:
        raise InvalidRequestError(field, "empty image reference")
    if text[:5].lower() == "data:":
        data = decode_data_uri(text, field=field, max_bytes=max_bytes)
        return decode_image_bytes(data, field=field, max_pixels=max_pixels)
    if "://" in text:
        data = fetch_url(text, field=field, max_bytes=max_bytes, allow_private=allow_private, timeout_s=timeout_s)
        return decode_image_bytes(data, field=field, max_pixels=max_pixels)
    return _from_path(Path(text), field, max_pixels, max_bytes, allow_local_paths)


# ----------------------------------------------------------------------------------------------------- decode


def sniff_format(head: bytes) -> str | None:
    """The image format named by the magic bytes, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 14:
        return "BMP"
    return None


def decode_image_bytes(data: bytes, *, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Sniff, open with that format's decoder only, check the size from the header, decode fully, apply EXIF
    orientation."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        head = data[:8].hex(" ") if data else "nothing"
        raise InvalidRequestError(field, f"not an image (content starts with {head})", SUPPORTED)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise InvalidRequestError(field, f"image too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequestError(field, f"cannot read {fmt} header ({e})") from None
    _check_pixels(image.size, max_pixels, field)
    _force_decode(image, field, fmt)
    return _apply_orientation(image)


def _force_decode(image: Image.Image, field: str, fmt: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise InvalidRequestError(field, f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise InvalidRequestError(field, f"truncated or corrupt {fmt} data ({e})") from None


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Camera JPEGs store rotation in EXIF; users expect the picture as displayed."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not reject a decodable image
        return image
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


def _check_pixels(size: tuple[int, int], max_pixels: int, field: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InvalidRequestError(field, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidRequestError(field, f"image is {w}x{h} = {w * h} pixels, over the limit",
                                  f"at most {max_pixels} pixels")


def _check_size(n: int, max_bytes: int, field: str) -> None:
    if n > max_bytes:
        raise InvalidRequestError(field, f"image data is {n} bytes, over the limit", f"at most {max_bytes} bytes")


def _check_pil(image: Image.Image, field: str, max_pixels: int) -> Image.Image:
    _check_pixels(image.size, max_pixels, field)
    _force_decode(image, field, image.format or image.mode)  # a lazily opened file decodes here
    return image


def _from_array(arr: np.ndarray, field: str, max_pixels: int) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InvalidRequestError(field, f"array of shape {arr.shape} is not an image", "HW, HW1, HW3 or HW4")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, field)
    arr = _to_uint8(arr, field)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def _to_uint8(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.rint(arr / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidRequestError(field, "float array contains NaN or infinity")
        return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise InvalidRequestError(field, f"unsupported array dtype {arr.dtype}", "uint8, uint16, bool, float in [0, 1]")


# ------------------------------------------------------------------------------------------------------ paths


def _from_path(path: Path, field: str, max_pixels: int, max_bytes: int, allowed: bool) -> Image.Image:
    if not allowed:
        raise InvalidRequestError(field, "local paths are not accepted here", "http(s) URL or data URI")
    path = path.expanduser()
    if not path.is_file():
        raise InvalidRequestError(field, f"no such file: {path}", "an existing image file, http(s) URL or data URI")
    try:
        _check_size(path.stat().st_size, max_bytes, field)
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(field, f"cannot read {path} ({e.strerror or e})") from None
    return decode_image_bytes(data, field=field, max_pixels=max_pixels)


# -------------------------------------------------------------------------------------------------- data URIs


def decode_data_uri(uri: str, *, field: str = "image_url", max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes; the declared mime type is ignored (the bytes are sniffed)."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InvalidRequestError(field, "malformed data URI (no comma)", "data:<mime>;base64,<data>")
    if header.lower().endswith(";base64"):
        compact = "".join(payload.split())
        _check_size(len(compact) * 3 // 4, max_bytes, field)
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(field, f"corrupted base64 in data URI ({e})") from None
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), max_bytes, field)
    return data


# ------------------------------------------------------------------------------------------------------- URLs


check_address = net.is_public_address  # the guard's address classification (kept under its old name)


def fetch_url(url: str, *, field: str = "image_url", max_bytes: int = DEFAULT_MAX_BYTES,
              allow_private: bool = False, timeout_s: float = 20) -> bytes:
    """GET an http(s) URL through the SSRF guard (engine/net.py): pinned resolution, checked redirects, capped."""
    return net.fetch(url, field=field, max_bytes=max_bytes, allow_private=allow_private, timeout_s=timeout_s,
                     accept="image/*")
