"""What every pass receives: the components, the family, the device, the config and the report to write to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..families import FamilySpec
from .config import CompileConfig
from .report import OptimizationReport


@dataclass
class PassContext:
    components: dict[str, Any]
    family: FamilySpec
    device: torch.device
    config: CompileConfig
    report: OptimizationReport
    state: dict[str, Any] = field(default_factory=dict)  # decisions later passes read (e.g. the compute dtype)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.family.denoiser]

    def modules(self, *names: str) -> list[tuple[str, torch.nn.Module]]:
        return [(n, self.components[n]) for n in names if isinstance(self.components.get(n), torch.nn.Module)]
