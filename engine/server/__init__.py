"""The HTTP server: `create_app(engine)` is the ASGI app (fal's protocols); `engine serve` runs it under uvicorn."""

from __future__ import annotations

from typing import Any


def create_app(engine: Any, **kwargs: Any) -> Any:
    """See `engine.server.app.create_app` (imported on use, so `import engine` never needs FastAPI)."""
    from .app import create_app as _create_app

    return _create_app(engine, **kwargs)


__all__ = ["create_app"]
