"""A local inference engine for diffusion image models (SD 1.5, SDXL, FLUX.1, AuraSR) that speaks fal's protocol."""

from . import errors
from .api import Engine
from .requests import GenerateRequest, Result, UpscaleRequest, UpscaleResult
from .service import Completed, InProgress, Queued, RequestHandle

__all__ = ["Completed", "Engine", "GenerateRequest", "InProgress", "Queued", "RequestHandle", "Result",
           "UpscaleRequest", "UpscaleResult", "errors"]
__version__ = "0.1.0"
