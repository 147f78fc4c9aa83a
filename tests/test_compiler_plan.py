"""The compile plan as data: what each optimization level does on simulated devices (T4 sm_75, A100 sm_80, L4 sm_89,
H100 sm_90, a CPU) for SDXL and FLUX, without a GPU; and, on this CPU, that a compiled model stays within its stated
recompile budget across resolutions."""

import itertools

import pytest
import torch

from engine import Engine
from engine.compiler import config_for_level, level_names
from engine.compiler.compile import CompiledScope, compile_counters
from engine.compiler.plan import (
    COMPILE_MODES,
    INDUCTOR_FLAGS_CUDA,
    CompilePlan,
    plan_compilation,
)
from engine.runtime.device import SIMULATED, DeviceCaps, best_half_dtype, device_caps, simulated_caps, supports_bf16

DEVICES = ["cpu", "sm_75", "sm_80", "sm_89", "sm_90"]
FAMILIES = ["sdxl", "flux"]
GRAPH_MODES = {m for (graphs, _), m in COMPILE_MODES.items() if graphs}


def plan(level: str, device: str, family: str, **overrides) -> CompilePlan:
    return plan_compilation(config_for_level(level, **overrides), simulated_caps(device), family)


ALL = list(itertools.product(level_names(), DEVICES, FAMILIES))


@pytest.mark.parametrize("level,device,family", ALL)
def test_invariants_hold_for_every_plan(level, device, family):
    p = plan(level, device, family)
    caps = SIMULATED[device]
    # CUDA graphs only around the whole denoiser with static shapes, never regional, never with the step cache
    if p.cuda_graphs:
        assert p.compile_scope == "whole" and p.fullgraph and p.dynamic is False
        assert p.cache is None
        assert caps.is_cuda
    if p.compile_scope == "regional" or p.cache is not None:
        assert not p.cuda_graphs and p.compile_mode not in GRAPH_MODES
    assert p.vae_compile_mode not in GRAPH_MODES
    # bf16 only with native support (CUDA >= 8.0)
    if p.dtype == "bf16" and caps.is_cuda:
        assert caps.capability >= (8, 0)
    # SageAttention (lossy) only at O3, and never inside a fullgraph compile
    if p.attention == "sage":
        assert level == "O3" and not (p.compile and p.fullgraph)
    # inductor flags only on CUDA, and only when compiling
    if p.inductor_flags:
        assert caps.is_cuda and p.compile
    # max-autotune only with static shapes
    if p.compile_mode and "max-autotune" in p.compile_mode:
        assert p.dynamic is False
    # fp8 only from 8.9
    if p.quant == "fp8":
        assert caps.capability >= (8, 9)
    assert p.as_dict()["family"] == family


# level, device, family -> (dtype, attention, quant, cache, cache threshold, scope, mode, graphs)
EXPECTED = {
    ("O0", "sm_90", "flux"): ("fp32", None, None, None, 0.08, None, None, False),
    ("O1", "sm_75", "flux"): ("fp16", "native", None, None, 0.08, None, None, False),
    ("O1", "sm_80", "flux"): ("bf16", "flash", None, None, 0.08, None, None, False),
    ("O1", "sm_90", "flux"): ("bf16", "_flash_3", None, None, 0.08, None, None, False),
    ("O1", "cpu", "flux"): ("bf16", "native", None, None, 0.08, None, None, False),
    ("O2", "cpu", "flux"): ("bf16", "native", None, None, 0.08, "regional", None, False),
    ("O2", "cpu", "sdxl"): ("bf16", "native", None, None, 0.08, "regional", None, False),
    ("O2", "sm_75", "sdxl"): ("fp16", "native", None, None, 0.08, "whole", "reduce-overhead", True),
    ("O2", "sm_80", "flux"): ("bf16", "flash", None, None, 0.08, "whole", "reduce-overhead", True),
    ("O2", "sm_89", "sdxl"): ("bf16", "flash", None, None, 0.08, "whole", "reduce-overhead", True),
    ("O2", "sm_90", "flux"): ("bf16", "_flash_3", None, None, 0.08, "whole", "reduce-overhead", True),
    ("O3", "cpu", "flux"): ("bf16", "native", None, "first_block", 0.08, "regional", None, False),
    ("O3", "sm_75", "flux"): ("fp16", "native", "int8_dynamic", "first_block", 0.08, "regional", None, False),
    ("O3", "sm_80", "flux"): ("bf16", "sage", "int8_dynamic", "first_block", 0.08, "regional", None, False),
    ("O3", "sm_89", "flux"): ("bf16", "sage", "fp8", "first_block", 0.12, "regional", None, False),
    ("O3", "sm_90", "flux"): ("bf16", "sage", "fp8", "first_block", 0.12, "regional", None, False),
    # the UNet has no cache hooks: no step cache, so the whole UNet gets CUDA graphs and max-autotune
    ("O3", "sm_90", "sdxl"): ("bf16", "_flash_3", "fp8", None, 0.08, "whole", "max-autotune", True),
    ("O3", "sm_75", "sdxl"): ("fp16", "native", "int8_dynamic", None, 0.08, "whole", "max-autotune", True),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_plan_table(key):
    p = plan(*key)
    got = (p.dtype, p.attention, p.quant, p.cache, p.cache_threshold, p.compile_scope, p.compile_mode, p.cuda_graphs)
    assert got == EXPECTED[key]


def test_inductor_flags_are_flux_fast_recipe_on_cuda_only():
    assert plan("O2", "sm_90", "flux").inductor_flags == INDUCTOR_FLAGS_CUDA
    assert INDUCTOR_FLAGS_CUDA["conv_1x1_as_mm"] and INDUCTOR_FLAGS_CUDA["coordinate_descent_tuning"]
    assert INDUCTOR_FLAGS_CUDA["epilogue_fusion"] is False
    assert plan("O2", "cpu", "flux").inductor_flags == {}
    assert plan("O1", "sm_90", "flux").inductor_flags == {}  # nothing compiled
    assert plan("O2", "sm_90", "flux", inductor_tuning=False).inductor_flags == {}
    import torch._inductor.config as c

    for name in INDUCTOR_FLAGS_CUDA:  # every flag exists in the installed inductor
        assert name in c.get_config_copy(), name


def test_attention_order_per_architecture():
    # Hopper: FA3 first, then cuDNN; without FA3 installed, cuDNN
    no_fa3 = simulated_caps("sm_90", attention_backends=frozenset({"native", "_native_cudnn", "flash"}))
    p = plan_compilation(config_for_level("O1"), no_fa3, "flux")
    assert p.attention == "_native_cudnn" and any("_flash_3" in why for why in p.attention_passed)
    # Ampere without flash-attn installed: cuDNN, then native SDPA
    bare = simulated_caps("sm_80", attention_backends=frozenset({"native", "_native_cudnn"}))
    assert plan_compilation(config_for_level("O2"), bare, "flux").attention == "_native_cudnn"
    # Sage is passed over below O3, with the reason
    p = plan("O2", "sm_89", "flux")
    assert p.attention == "flash" and any(why.startswith("sage: lossy") for why in p.attention_passed)
    assert plan("O1", "sm_89", "flux", attention_allow_lossy=True).attention == "sage"
    # diffusers calls sageattn directly: not under a fullgraph compile (the whole-model CUDA-graph plan)
    p = plan("O2", "sm_89", "flux", attention_allow_lossy=True)
    assert p.attention == "flash" and any("fullgraph" in why for why in p.attention_passed)
    # fp32 rules out the half-precision kernels
    assert plan("O2", "sm_90", "flux", dtype="fp32").attention == "native"
    # an explicit backend that is not installed falls back to native SDPA, saying so
    p = plan("O1", "sm_75", "flux", attention="flash")
    assert p.attention == "native" and "not available" in p.attention_passed[0]


def test_cache_never_with_graphs_and_threshold_raised_for_fp8():
    p = plan("O2", "sm_90", "flux", cache="first_block")
    assert p.cache == "first_block" and not p.cuda_graphs and p.compile_scope == "regional"
    assert "pytorch#152887" in p.cuda_graphs_note and p.fullgraph is False
    # forcing graphs does not override soundness
    p = plan("O3", "sm_90", "flux", cuda_graphs=True)
    assert not p.cuda_graphs and p.compile_mode not in GRAPH_MODES
    # explicit reduce-overhead with regional compile becomes the mode without graphs
    p = plan("O2", "sm_90", "flux", cache="first_block", compile_mode="max-autotune", compile_dynamic=False)
    assert p.compile_mode == "max-autotune-no-cudagraphs"
    p = plan("O2", "sm_90", "flux", cuda_graphs=False, compile_mode="reduce-overhead")
    assert p.compile_mode is None and p.compile_scope == "regional"
    # fp8 raises the threshold (0.08 -> 0.12) and the plan says why; other kinds leave it
    p = plan("O3", "sm_90", "flux")
    assert p.cache_threshold == pytest.approx(0.12) and "fp8" in p.cache_note
    assert plan("O3", "sm_90", "flux", quant="int8_weight_only").cache_threshold == pytest.approx(0.08)
    assert plan("O3", "sm_90", "flux", cache_threshold=0.9).cache_threshold == 1.0  # capped


def test_static_shapes_and_recompile_budget_with_graphs():
    p = plan("O2", "sm_90", "flux", recompile_limit=3)
    assert p.compile_kwargs() == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    assert p.recompile_limit == 3 and "at most 3" in p.cuda_graphs_note
    # autotune wanted but shapes symbolic (regional with the cache): tuned only where static, and said so
    p = plan("O3", "sm_90", "flux")
    assert p.dynamic and p.compile_mode is None and "needs static shapes" in p.autotune_note


def test_bf16_only_with_native_support():
    for name, caps in SIMULATED.items():
        half = best_half_dtype(caps)
        if caps.is_cuda:
            assert (half == torch.bfloat16) == (caps.capability >= (8, 0)), name
            assert half in (torch.bfloat16, torch.float16)
    assert best_half_dtype(DeviceCaps("mps")) == torch.float16
    assert best_half_dtype(DeviceCaps("cpu", bf16=False)) is None
    real = device_caps(torch.device("cpu"))
    assert real.type == "cpu" and supports_bf16(torch.device("cpu")) == real.bf16


def test_scope_applies_budget_and_flags_only_inside():
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    from engine.compiler.compile import CompileStats

    p = plan("O2", "sm_90", "flux", recompile_limit=3)
    before = (dynamo_config.recompile_limit, inductor_config.coordinate_descent_tuning, inductor_config.epilogue_fusion)
    scope = CompiledScope(p, CompileStats(model="x", budget=3))
    with scope():
        assert dynamo_config.recompile_limit == 3
        assert inductor_config.coordinate_descent_tuning is True and inductor_config.epilogue_fusion is False
    after = (dynamo_config.recompile_limit, inductor_config.coordinate_descent_tuning, inductor_config.epilogue_fusion)
    assert after == before  # nothing leaks: flags are never set globally
    assert scope.stats.jobs == 1 and scope.stats.recompiles == 0


def test_recompiles_across_three_resolutions_stay_within_budget():
    """O2 on this CPU: regional compile with symbolic sizes. Three resolutions compile once; the per-model count
    (state["compile_stats"], the pipeline's run_context) says so, and stays within the stated budget."""
    eng = Engine(device="cpu", opt_level="O2")
    kw = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=2, guidance_scale=3.5, seed=1)
    eng.generate(model="tiny-flux", **kw)
    report = eng.optimization_report("tiny-flux")
    assert report.status("compile") == "applied" and "recompile budget 8" in report.details("compile")[0]
    assert report.status("cuda_graphs") == "skipped"
    scope = eng._slot("tiny-flux").pipeline.run_context
    assert isinstance(scope, CompiledScope)
    stats = scope.stats
    first = stats.graphs
    assert first > 0 and stats.jobs == 1
    graphs = compile_counters()["unique_graphs"]
    eng.generate(model="tiny-flux", **{**kw, "width": 96, "height": 80})
    eng.generate(model="tiny-flux", **{**kw, "width": 128, "height": 64})
    assert stats.jobs == 3
    assert stats.recompiles <= stats.budget == 8
    assert stats.recompiles == 0, stats.as_dict()  # symbolic sizes: no recompile at all
    assert compile_counters()["unique_graphs"] == graphs
    shown = eng.optimization_report("tiny-flux")
    assert shown.compile_stats == {**stats.as_dict()} and shown.as_dict()["compile_stats"]["recompiles"] == 0
    assert "0 recompiles (budget: 8 compiling jobs)" in str(shown)


def test_scope_enforces_the_budget_on_static_shapes():
    """With static shapes each new size is a graph; past the plan's recompile_limit new sizes run eagerly (still
    correct; with fullgraph=True dynamo's own limit would fail hard), compiled sizes keep their graphs, and the
    per-model stats count what was compiled."""
    from engine.compiler.compile import CompileStats

    torch._dynamo.reset()
    p = plan("O2", "cpu", "flux", recompile_limit=2, compile_dynamic=False)
    assert p.compile_kwargs() == {"fullgraph": True, "dynamic": False}
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    compiled = torch.compile(model, **p.compile_kwargs())
    scope = CompiledScope(p, CompileStats(model="toy", budget=p.recompile_limit))
    for rows in (1, 2, 3, 4, 5, 1):
        x = torch.randn(rows, 8)
        with torch.no_grad(), scope():
            torch.testing.assert_close(compiled(x), model(x))
    assert scope.stats.jobs == 6 and scope.stats.graphs == 2  # sizes 3, 4, 5 ran eagerly
    assert scope.stats.recompiles == 1 <= scope.stats.budget and scope.stats.exhausted
