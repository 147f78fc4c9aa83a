"""A local inference engine for diffusion image models (SD 1.5, SDXL, FLUX.1, AuraSR) that speaks fal's protocol:
`Engine` runs models; `FalService(engine)` wraps one with fal's API (run, submit, subscribe, stream)."""

from . import errors
from .api import Engine
from .requests import GenerateRequest, Result, UpscaleRequest, UpscaleResult
from .service import Completed, FalService, InProgress, Queued, RequestHandle

__all__ = ["Completed", "Engine", "FalService", "GenerateRequest", "InProgress", "Queued", "RequestHandle", "Result",
           "UpscaleRequest", "UpscaleResult", "errors"]
__version__ = "0.1.0"
