"""`generate_batch(engine, requests)`: placeholder replaced below."""
from __future__ import annotations

from typing import Any


def generate_batch(engine: Any, requests: list[Any]) -> list[Any]:
    out: list[Any] = []
    for request in requests:
        try:
            out.append(engine.generate(request))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out
