"""compile and cuda_graphs passes: torch.compile of the denoiser and the VAE decoder, as the plan decided.

Two shapes of compilation (engine/compiler/plan.py picks one):
- regional (diffusers' `compile_repeated_blocks`): one transformer block compiled once, its code reused for every
  instance, so compile time does not grow with depth; sizes are symbolic (`dynamic=True`), so a new resolution does
  not recompile. Never with CUDA graphs: a CUDA-graph tree takes each block call for a new iteration and overwrites
  the previous block's output (pytorch#152887).
- whole denoiser with static shapes (`fullgraph=True, dynamic=False`) and CUDA graphs ("reduce-overhead", or
  "max-autotune" where the level tunes): one graph per resolution, up to `recompile_limit` resolutions.

Compilation is lazy, so what shapes it (inductor flags, the recompile budget, duck shaping) is applied by the
`CompiledScope` the pipeline enters around its calls, never globally; the scope also counts the graphs each model
compiles (`CompileStats`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .artifacts import use_compile_cache
from .context import PassContext
from .plan import CompilePlan, plan_of, replan


def apply_cuda_graphs(ctx: PassContext) -> None:
    """Reports the plan's CUDA-graph decision against what the earlier passes actually did; runs before compile."""
    plan = plan_of(ctx)
    if plan.cuda_graphs and ctx.state.get("cache"):  # the family table said no cache hooks; the model had them
        plan = replan(ctx, step_cache_hooks=True)
    exported = ctx.state.get("backend", {})
    if plan.cuda_graphs and ctx.family.denoiser in exported:
        ctx.report.skipped("cuda_graphs", f"the {ctx.family.denoiser} runs on {exported[ctx.family.denoiser]} "
                           "(exported graph)")
        return
    if not plan.cuda_graphs:
        ctx.report.skipped("cuda_graphs", plan.cuda_graphs_note)
        return
    ctx.report.applied("cuda_graphs", f"torch.compile mode {plan.compile_mode} (CUDA graph trees): "
                       f"{plan.cuda_graphs_note}")


def apply_compile(ctx: PassContext) -> None:
    """Compile what still runs in PyTorch: components the backend pass exported are left alone (and said so)."""
    plan = plan_of(ctx)
    if not plan.compile:
        ctx.report.skipped("compile", "disabled in config")
        return
    exported: dict[str, str] = ctx.state.get("backend", {})
    denoiser_name = ctx.family.denoiser
    for name in (denoiser_name, "vae"):
        if name in exported and (name != "vae" or ctx.config.compile_vae):
            what = "vae decoder" if name == "vae" else name
            ctx.report.skipped("compile", f"{what}: runs on {exported[name]} (exported graph), not compiled")
    todo_denoiser = denoiser_name not in exported
    todo_vae = ctx.config.compile_vae and "vae" not in exported
    if not (todo_denoiser or todo_vae):
        return
    cache = use_compile_cache(ctx.device)
    kwargs = plan.compile_kwargs()
    done = []
    if todo_denoiser:
        model = ctx.denoiser
        blocks = getattr(model, "_repeated_blocks", None)
        if plan.compile_scope == "regional" and blocks:
            model.compile_repeated_blocks(**kwargs)
            done.append(f"{type(model).__name__} blocks {', '.join(blocks)}")
        else:
            model.compile(**kwargs)
            done.append(f"{type(model).__name__} whole model")
        if plan.cache and not plan.fullgraph:
            # The step cache decides whether to skip the remaining blocks in a function diffusers marks
            # torch.compiler.disable: a deliberate graph break inside the first block.
            done[-1] += f" with fullgraph=False (the {plan.cache} cache decides eagerly)"
    if todo_vae:
        vae_kwargs = {"fullgraph": False, "dynamic": plan.dynamic}
        if plan.vae_compile_mode:
            vae_kwargs["mode"] = plan.vae_compile_mode
        ctx.components["vae"].decoder.compile(**vae_kwargs)
        done.append("vae decoder" + (f" (mode={plan.vae_compile_mode})" if plan.vae_compile_mode else ""))
    stats = CompileStats(model=type(ctx.denoiser).__name__, budget=plan.recompile_limit)
    ctx.state["compiled"] = True
    ctx.state["compile_stats"] = stats
    ctx.state["run_context"] = CompiledScope(plan, stats)
    flags = f"; inductor flags {dict(plan.inductor_flags)}" if plan.inductor_flags else ""
    tune = f"; {plan.autotune_note}" if plan.autotune_note and "needs" in plan.autotune_note else ""
    ctx.report.applied("compile", f"{'; '.join(done)} (dynamic={kwargs['dynamic']}, fullgraph={kwargs['fullgraph']}"
                       f"{', mode=' + kwargs['mode'] if 'mode' in kwargs else ''}); recompile budget "
                       f"{plan.recompile_limit} (jobs that may compile; later new shapes run eagerly){flags}{tune}; "
                       f"cache {cache}")


def controlnet_compile_key(plan: CompilePlan | None) -> tuple[Any, ...] | None:
    """What `compile_like_denoiser` does to a ControlNet under `plan`, hashable: None (eager) or the regional
    compile settings. Compiling changes the module in place, so an engine caches its loaded ControlNets per key: a
    model loaded at O0/O1 never runs one another model's plan compiled."""
    if plan is None or not plan.compile or plan.compile_scope != "regional":
        return None
    return ("regional", tuple(sorted((k, repr(v)) for k, v in plan.compile_kwargs().items())))


def compile_like_denoiser(module: torch.nn.Module, denoiser: torch.nn.Module, plan: CompilePlan | None
                          ) -> tuple[bool, str]:
    """A request's ControlNet gets the denoiser's treatment; (applied, what it got or why not).

    Under regional compile its instances of the denoiser's repeated blocks (a UNet ControlNet holds the UNet's
    `BasicTransformerBlock`s, a FLUX ControlNet the transformer's blocks) are compiled with the same settings, so
    dynamo serves them with the code compiled for the denoiser's blocks (symbolic sizes: no recompile per
    resolution). Under whole-model compile (CUDA graphs, static shapes) it runs eagerly: each ControlNet would add
    a graph tree per resolution, and the recompile budget is the denoiser's."""
    name = type(module).__name__
    if plan is None or not plan.compile:
        return False, f"{name}: not compiled (the denoiser is not compiled)"
    if plan.compile_scope != "regional":
        return False, (f"{name}: runs eagerly: the denoiser is compiled whole with static shapes"
                       f"{' and CUDA graphs' if plan.cuda_graphs else ''}, where each ControlNet would add graphs "
                       "per resolution outside the denoiser's recompile budget")
    blocks = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
    todo = [m for m in module.modules() if type(m).__name__ in blocks]
    if not todo:
        return False, f"{name}: has none of the denoiser's repeated blocks ({', '.join(blocks) or 'none'}): eager"
    kwargs = plan.compile_kwargs()
    for block in todo:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(**kwargs)
    kinds = ", ".join(sorted({type(m).__name__ for m in todo}))
    return True, (f"{name}: {len(todo)} blocks ({kinds}) compiled regionally as the denoiser's "
                  f"(dynamic={kwargs['dynamic']}, fullgraph={kwargs['fullgraph']})")


@dataclass
class CompileStats:
    """Graphs dynamo compiled while one model ran. The first job compiles; graphs after it are recompiles (a new
    resolution with static shapes, a guard that failed). Counted from dynamo's process-wide counters around the
    model's calls: exact while one job runs at a time in the process (the engine's device lock)."""

    model: str
    budget: int  # recompile_limit: jobs that may compile (with static shapes: resolutions that get graphs)
    jobs: int = 0
    graphs: int = 0
    first_job_graphs: int = 0
    compiling_jobs: int = 0  # jobs that compiled at least one graph

    @property
    def recompiles(self) -> int:
        return self.graphs - self.first_job_graphs

    @property
    def exhausted(self) -> bool:
        return self.compiling_jobs >= self.budget

    def record(self, new_graphs: int) -> None:
        self.jobs += 1
        self.graphs += new_graphs
        self.compiling_jobs += new_graphs > 0
        if self.jobs == 1:
            self.first_job_graphs = new_graphs

    def as_dict(self) -> dict[str, int | str]:
        return {"model": self.model, "budget": self.budget, "jobs": self.jobs, "graphs": self.graphs,
                "recompiles": self.recompiles, "compiling_jobs": self.compiling_jobs}


class CompiledScope:
    """The pipeline's `run_context`: entered around every job of a compiled model.

    - duck shaping off: dynamo would otherwise merge sizes that happen to be equal on the first call (e.g. 16 image
      tokens and a head dim of 16) and recompile when a new resolution separates them;
    - the recompile budget: once `recompile_limit` jobs have compiled, new shapes run eagerly (compiled code still
      serves the shapes it was compiled for: `torch.compiler.set_stance("eager_on_recompile")`); dynamo's own
      `recompile_limit` (per function) is set to the same number as a backstop. Past dynamo's limit a fullgraph
      function fails hard instead of running eagerly, which the stance prevents;
    - on CUDA, the plan's inductor flags (flux-fast's recipe).
    Compilation is lazy (on the first call), so this must wrap the calls, not the `compile()`."""

    _lock = threading.Lock()  # the counters are process-wide

    def __init__(self, plan: CompilePlan, stats: CompileStats):
        self.plan = plan
        self.stats = stats

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as fx_config

        with contextlib.ExitStack() as stack:
            stack.enter_context(fx_config.patch(use_duck_shape=False))
            stack.enter_context(dynamo_config.patch(recompile_limit=self.plan.recompile_limit))
            if self.stats.exhausted:
                stack.enter_context(torch.compiler.set_stance("eager_on_recompile"))
            if self.plan.inductor_flags:
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(dict(self.plan.inductor_flags)))
            before = _unique_graphs()
            try:
                yield
            finally:
                with self._lock:
                    self.stats.record(_unique_graphs() - before)


def compiled_run_context() -> Any:
    """Duck shaping off, without a plan's budget or flags (kept for callers that compile by hand)."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_counters() -> dict[str, int]:
    """Dynamo/inductor counters worth asserting on: graphs compiled, FX cache hits and misses."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "calls_captured": counters["stats"]["calls_captured"],
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"]}


def reset_compile_counters() -> None:
    torch._dynamo.utils.counters.clear()


def is_recompile_limit(error: BaseException) -> bool:
    """Dynamo's hard failure when a `fullgraph=True` function passes its recompile limit. The limit counts per code
    object, across every instance of a model class (also deleted ones: a reloaded or second model of the same class
    shares it), so a model's own budget cannot always see it coming."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return isinstance(error, FailOnRecompileLimitHit)


def run_compiled(pipeline: Any, params: Any, step_callback: Any) -> Any:
    """Run a job; when dynamo's recompile limit was hit, run it again eagerly for new shapes (compiled shapes keep
    their graphs) and keep this model in that stance from now on."""
    try:
        return pipeline(params, step_callback=step_callback)
    except Exception as e:
        if not is_recompile_limit(e):
            raise
        log_note = f"{type(e).__name__}"
    scope = pipeline.run_context
    stats = getattr(scope, "stats", None)
    if stats is not None:
        stats.compiling_jobs = max(stats.compiling_jobs, stats.budget)  # exhausted: eager_on_recompile from now on
    import logging

    logging.getLogger(__name__).warning("recompile limit reached (%s): this job and new shapes run eagerly", log_note)
    with torch.compiler.set_stance("eager_on_recompile"):
        return pipeline(params, step_callback=step_callback)
