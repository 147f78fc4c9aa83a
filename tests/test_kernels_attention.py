"""xFormers as an attention backend: the plan picks it through diffusers' dispatcher where it is installed and the
better choice (before Ampere, where FlashAttention does not run; on newer GPUs ahead of plain SDPA when no flash
kernel is installed), never under a fullgraph compile (its Python dispatch breaks graphs, xformers#765); the UNet's
classic processors take it through diffusers' `enable_xformers_memory_efficient_attention`, except when q/k/v are
fused. Tested on simulated device capabilities (xformers itself pulls a CUDA torch and is not installed here)."""

import diffusers
import pytest
import torch

from engine.compiler import CompileConfig, config_for_level
from engine.compiler.attention import apply_attention, backend_available
from engine.compiler.context import PassContext
from engine.compiler.layout import fuse_qkv
from engine.compiler.plan import installed_attention_backends, plan_compilation
from engine.compiler.report import OptimizationReport
from engine.families import get_family
from engine.loading.tiny import ensure_tiny_model
from engine.runtime.device import simulated_caps

XF = frozenset({"native", "xformers"})


@pytest.mark.parametrize("caps,backends,level,want", [
    ("sm_75", XF, "O1", "xformers"),  # Turing: no FlashAttention; xFormers' cutlass kernels
    ("sm_75", frozenset({"native"}), "O1", "native"),  # not installed: SDPA
    ("sm_80", XF, "O1", "xformers"),  # Ampere without flash / cuDNN attention installed
    ("sm_80", XF | {"flash", "_native_cudnn"}, "O1", "flash"),  # FlashAttention 2 first
    ("sm_90", XF | {"_flash_3", "_native_cudnn", "flash"}, "O1", "_flash_3"),  # Hopper: FA3
    ("sm_75", XF, "O2", "native"),  # O2 on CUDA: whole-model fullgraph compile, which xFormers breaks
])
def test_auto_attention_picks_xformers_where_it_is_the_better_choice(caps, backends, level, want):
    plan = plan_compilation(config_for_level(level), simulated_caps(caps, attention_backends=backends), "flux")
    assert plan.attention == want, plan.attention_passed
    if level == "O2" and caps == "sm_75":
        assert any(p.startswith("xformers: not traceable") for p in plan.attention_passed)
    if want == "native" and "xformers" not in backends:
        assert "xformers: not installed" in plan.attention_passed


def test_xformers_in_fp32_and_when_named():
    """xFormers' kernels take fp32 (unlike FlashAttention), and an explicit attention="xformers" is honoured."""
    fp32 = CompileConfig(dtype="fp32", attention="auto")
    assert plan_compilation(fp32, simulated_caps("sm_75", attention_backends=XF), "flux").attention == "xformers"
    named = CompileConfig(attention="xformers")
    assert plan_compilation(named, simulated_caps("sm_80", attention_backends=XF), "flux").attention == "xformers"
    fallback = plan_compilation(named, simulated_caps("sm_80"), "flux")
    assert fallback.attention == "native" and fallback.attention_passed == ("xformers: not available here",)


def test_xformers_is_probed_like_the_other_backends():
    ok, why = backend_available("xformers")
    installed = "xformers" in installed_attention_backends()
    assert ok is installed
    if not ok:
        assert "xformers" in why.lower()


def _ctx(model: torch.nn.Module, caps) -> PassContext:
    ctx = PassContext(components={"unet": model}, family=get_family("sdxl"), device=torch.device("cpu"),
                      config=CompileConfig(attention="auto", dtype="fp16"), report=OptimizationReport("x", "cpu"))
    ctx.state["caps"] = caps
    return ctx


def test_unet_switches_to_xformers_through_diffusers(monkeypatch):
    unet = diffusers.UNet2DConditionModel.from_pretrained(ensure_tiny_model("sdxl"), subfolder="unet")
    calls = []
    # diffusers' switch needs the xformers package; record that the pass asks diffusers for it
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", lambda: calls.append("xformers"))
    ctx = _ctx(unet, simulated_caps("sm_75", attention_backends=XF))
    apply_attention(ctx)
    assert calls == ["xformers"]
    assert ctx.report.details("attention") == ["UNet2DConditionModel -> xformers (diffusers' XFormersAttnProcessor)"]

    fuse_qkv(unet)  # XFormersAttnProcessor reads to_q/to_k/to_v, which fusing dropped
    ctx = _ctx(unet, simulated_caps("sm_75", attention_backends=XF))
    apply_attention(ctx)
    assert calls == ["xformers"] and ctx.report.status("attention") == "skipped"
    assert "fused" in ctx.report.details("attention")[0]
