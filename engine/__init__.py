"""A local inference engine for diffusion image models (SD 1.5, SDXL, FLUX.1, AuraSR) that speaks fal's protocol."""

from . import errors
from .api import Engine
from .requests import GenerateRequest, Result, UpscaleRequest, UpscaleResult

__all__ = ["Engine", "GenerateRequest", "Result", "UpscaleRequest", "UpscaleResult", "errors"]
__version__ = "0.1.0"
