"""What the compiler did: each pass applied (with what it chose) or skipped (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class PassResult:
    name: str
    status: Literal["applied", "skipped"]
    detail: str


@dataclass
class OptimizationReport:
    config_hash: str
    device: str
    results: list[PassResult] = field(default_factory=list)
    memory_plan: list[str] = field(default_factory=list)  # the placement chosen for the device budget, and why
    compile_stats: dict[str, object] | None = None  # graphs compiled so far, recompiles, budget (compiled models)

    def applied(self, name: str, detail: str) -> None:
        self.results.append(PassResult(name, "applied", detail))

    def skipped(self, name: str, reason: str) -> None:
        self.results.append(PassResult(name, "skipped", reason))

    def withdraw(self, name: str, reason: str) -> None:
        """A pass that stopped applying after load (e.g. CFG-parallel after the second GPU ran out of memory): its
        entries become one skipped entry that keeps what it had applied."""
        before = "; ".join(r.detail for r in self.results if r.name == name)
        kept = [r for r in self.results if r.name != name]
        self.results = kept + [PassResult(name, "skipped", f"{reason} (was: {before})" if before else reason)]

    def status(self, name: str) -> str | None:
        """"applied" if any result of pass `name` applied, else "skipped" if one was recorded, else None."""
        found = [r for r in self.results if r.name == name]
        if not found:
            return None
        return "applied" if any(r.status == "applied" for r in found) else "skipped"

    def details(self, name: str) -> list[str]:
        return [r.detail for r in self.results if r.name == name]

    def as_dict(self) -> dict[str, object]:
        return {"config_hash": self.config_hash, "device": self.device,
                "passes": [{"name": r.name, "status": r.status, "detail": r.detail} for r in self.results],
                "memory_plan": list(self.memory_plan), "compile_stats": self.compile_stats}

    def __str__(self) -> str:
        width = max((len(r.name) for r in self.results), default=4)
        lines = [f"optimization report ({self.device}, config {self.config_hash})"]
        lines += [f"  {r.name.ljust(width)}  {r.status:8} {r.detail}" for r in self.results]
        if self.compile_stats:
            c = self.compile_stats
            lines.append(f"compiled: {c['graphs']} graphs over {c['jobs']} jobs, {c['recompiles']} recompiles "
                         f"(budget: {c['budget']} compiling jobs)")
        if self.memory_plan:
            lines.append("memory plan")
            lines += [f"  {line}" for line in self.memory_plan]
        return "\n".join(lines)
