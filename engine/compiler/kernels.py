"""kernels pass: swap the engine's Triton kernels (engine/kernels) into the denoiser and the VAE, as the plan decided
("auto": on CUDA at O2/O3; forced with `kernels=True`, which tests do on a CPU under TRITON_INTERPRET=1).

Runs after the passes that rewrite projections and weights (fuse_qkv, quant, the LoRA slots, which may unfuse q/k/v)
and before the export backend, offload placement and compile: compile traces the custom ops (no graph break) and
offload hooks wrap the fused modules. Components the export backend will replace are left alone (a custom op does
not export to ONNX). The report says, per kernel, how many modules of which class it replaced and where, and what it
left alone and why; `engine.kernels.remove_kernels(model)` puts the library modules back.
"""

from __future__ import annotations

from .context import PassContext
from .plan import plan_of

NAME = "kernels"
SHOWN_PATHS = 3  # module paths named per class in the report; the rest are counted


def _where(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN_PATHS])
    return shown + (f", ... +{len(paths) - SHOWN_PATHS}" if len(paths) > SHOWN_PATHS else "")


def apply_kernels_pass(ctx: PassContext) -> None:
    from ..kernels import unavailable_reason

    plan = plan_of(ctx)
    if not plan.kernels:
        ctx.report.skipped(NAME, plan.kernels_note)
        return
    why = unavailable_reason(ctx.device)
    if why is not None:
        ctx.report.skipped(NAME, why)
        return
    from ..kernels import apply_kernels

    names = [ctx.family.denoiser, "vae"]
    if ctx.config.backend != "torch":
        ctx.report.skipped(NAME, f"{ctx.family.denoiser}, vae: the {ctx.config.backend} backend exports them to "
                                 "ONNX, which has no custom ops")
        return
    by_kernel: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for name, module in ctx.modules(*names):
        for kernel, use in apply_kernels(module).items():
            parts = [f"{name}: {len(p)} {cls} ({_where(p)})" for cls, p in use.replaced.items()]
            parts += [f"{name}: left {len(p)} ({reason}: {_where(p)})" for reason, p in use.left.items()]
            by_kernel.setdefault(kernel, []).extend(parts)
            counts[kernel] = counts.get(kernel, 0) + use.count
    ctx.state["kernels"] = {k: n for k, n in counts.items() if n}
    for kernel, parts in by_kernel.items():
        detail = f"{kernel}: " + "; ".join(parts)
        (ctx.report.applied if counts[kernel] else ctx.report.skipped)(NAME, detail)
    if not by_kernel:
        ctx.report.skipped(NAME, "no module a kernel fits (" + ", ".join(n for n, _ in ctx.modules(*names)) + ")")
