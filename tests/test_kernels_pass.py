"""The `kernels` compiler pass: tiny SDXL and FLUX generate the same images with the engine's Triton kernels forced
on (run by Triton's interpreter on the CPU) as without them, at O0 and O1, with a LoRA and with group offload; the
report says per kernel what was replaced and where; `remove_kernels` puts diffusers' modules back; a block holding
the custom ops compiles without graph breaks; the pass says why it is skipped (CPU auto, no triton, ONNX export)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel module is imported (Triton reads it then)

import subprocess  # noqa: E402
import sys  # noqa: E402

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import images_close  # noqa: E402
from engine import Engine  # noqa: E402
from engine.compiler import CompileConfig, config_for_level  # noqa: E402
from engine.compiler.context import PassContext  # noqa: E402
from engine.compiler.kernels import apply_kernels_pass  # noqa: E402
from engine.compiler.plan import plan_compilation  # noqa: E402
from engine.compiler.report import OptimizationReport  # noqa: E402
from engine.families import get_family  # noqa: E402
from engine.loading.tiny import ensure_tiny_model  # noqa: E402
from engine.runtime.device import simulated_caps  # noqa: E402

pytest.importorskip("triton")

from engine.kernels import remove_kernels  # noqa: E402
from engine.kernels import modules as km  # noqa: E402

KW = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=64, num_inference_steps=2,
          guidance_scale=5.0, seed=1)
FORCED = {"kernels": True, "dtype": "fp32"}  # fp32: the kernels must reproduce the stock run to fp32 rounding
EXPECTED = {"tiny-sdxl": {"group_norm_silu"}, "tiny-flux": {"group_norm_silu", "layer_norm_modulate", "rms_norm_rope"}}


def _kernels_applied(report) -> dict[str, str]:
    return {r.detail.split(":")[0]: r.detail for r in report.results if r.name == "kernels" and r.status == "applied"}


@pytest.mark.parametrize("model,level", [("tiny-sdxl", "O1"), ("tiny-flux", "O0"), ("tiny-flux", "O1")])
def test_generate_with_kernels_equals_without(model, level):
    base = Engine(device="cpu", opt_level=level, compile_config={"dtype": "fp32"})
    eng = Engine(device="cpu", opt_level=level, compile_config=FORCED)
    applied = _kernels_applied(eng.optimization_report(model))
    assert set(applied) == EXPECTED[model], applied
    components = eng._slot(model).loaded.components
    assert km.kernel_count(components[eng._slot(model).loaded.family.denoiser]) > 0
    ok, frac = images_close(base.generate(model=model, **KW).images, eng.generate(model=model, **KW).images)
    assert ok, f"{model} at {level}: {frac:.4f} of values within one level"


def test_compiled_o2_with_kernels_equals_eager_o0():
    """O2 on a CPU: regional compile of FLUX's blocks, which hold the custom ops, traced without graph breaks
    (fullgraph); the same image as stock fp32 eager."""
    eng = Engine(device="cpu", opt_level="O2", compile_config={**FORCED, "compile_vae": False})
    report = eng.optimization_report("tiny-flux")
    assert report.status("compile") == "applied" and set(_kernels_applied(report)) == EXPECTED["tiny-flux"]
    base = Engine(device="cpu", opt_level="O0").generate(model="tiny-flux", **KW).images
    assert images_close(base, eng.generate(model="tiny-flux", **KW).images)[0]


def test_report_says_what_was_replaced_and_where():
    eng = Engine(device="cpu", compile_config=FORCED)
    applied = _kernels_applied(eng.optimization_report("tiny-flux"))
    assert "transformer: 4 AdaLayerNormZero (transformer_blocks.0.norm1, transformer_blocks.0.norm1_context" in \
        applied["layer_norm_modulate"]
    assert "AdaLayerNormZeroSingle (single_transformer_blocks.0.norm" in applied["layer_norm_modulate"]
    assert "AdaLayerNormContinuous (norm_out)" in applied["layer_norm_modulate"]
    assert "FluxAttention (transformer_blocks.0.attn" in applied["rms_norm_rope"]
    assert "vae: 16 ResnetBlock2D (encoder.down_blocks.0.resnets.0" in applied["group_norm_silu"]


def test_lora_on_kernel_modules_matches_lora_without_them(tmp_path):
    """peft wraps the projections the fused modules call (FLUX: unfusing q/k/v at O1 first), so a LoRA changes
    the image and matches the same LoRA without the kernels."""
    from test_lora import make_lora

    lora = [{"path": str(make_lora(tmp_path / "f.safetensors", 5, family="flux", strength=4.0)), "scale": 1.0}]
    eng = Engine(device="cpu", opt_level="O1", compile_config=FORCED)
    base = Engine(device="cpu", opt_level="O1", compile_config={"dtype": "fp32"})
    plain = eng.generate(model="tiny-flux", **KW).images
    with_lora = eng.generate(model="tiny-flux", **KW, loras=lora).images
    assert not images_close(plain, with_lora)[0]
    assert images_close(with_lora, base.generate(model="tiny-flux", **KW, loras=lora).images)[0]
    assert km.kernel_count(eng._slot("tiny-flux").loaded.components["transformer"]) > 0


def test_group_offload_hooks_wrap_the_kernel_modules():
    resident = Engine(device="cpu", compile_config={"dtype": "fp32"}).generate(model="tiny-sdxl", **KW).images
    eng = Engine(device="cpu", compile_config=FORCED, memory_plan="group_offload")
    assert _kernels_applied(eng.optimization_report("tiny-sdxl"))
    assert images_close(resident, eng.generate(model="tiny-sdxl", **KW).images)[0]


def _tiny_flux() -> torch.nn.Module:
    return diffusers.FluxTransformer2DModel.from_pretrained(ensure_tiny_model("flux"), subfolder="transformer")


def test_remove_kernels_puts_the_library_modules_back():
    model = _tiny_flux()
    model.set_attention_backend("_native_math")  # what the attention pass chose survives the processor swap
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    uses = km.apply_kernels(model)
    assert {k for k, u in uses.items() if u.count} == {"layer_norm_modulate", "rms_norm_rope"}
    # the same tensors under the same names: LoRA, offload and state_dict loading see the model they expect
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert isinstance(model.transformer_blocks[0].norm1, diffusers.models.normalization.AdaLayerNormZero)
    assert type(model.transformer_blocks[0].attn.processor) is km.FusedFluxAttnProcessor
    assert model.transformer_blocks[0].attn.processor._attention_backend == "_native_math"
    assert remove_kernels(model) > 0
    assert km.kernel_count(model) == 0
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert remove_kernels(model) == 0
    assert model.single_transformer_blocks[0].attn.processor._attention_backend == "_native_math"


def _flux_block_inputs(model):
    torch.manual_seed(0)
    block = model.transformer_blocks[0]
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    head = model.config.attention_head_dim
    txt, img = 3, 8
    cos, sin = (torch.randn(txt + img, head), torch.randn(txt + img, head))
    return block, (torch.randn(1, img, dim), torch.randn(1, txt, dim), torch.randn(1, dim), (cos, sin))


def test_fused_blocks_compile_without_graph_breaks():
    model = _tiny_flux().eval()
    block, (hs, ehs, temb, rope) = _flux_block_inputs(model)
    with torch.no_grad():
        want = block(hs, ehs, temb, rope)
        km.apply_kernels(model)
        block = model.transformer_blocks[0]
        eager = block(hs, ehs, temb, rope)
        explained = torch._dynamo.explain(block)(hs, ehs, temb, rope)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert "engine_kernels" in str(explained.graphs[0].graph)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)(hs, ehs, temb, rope)
    for w, e, c in zip(want, eager, compiled):
        torch.testing.assert_close(e, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, w, atol=1e-5, rtol=1e-5)


def test_fused_resnet_block_compiles_in_both_layouts():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    parent = torch.nn.ModuleDict({"block": ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8,
                                                         groups=4)}).eval()
    x, temb = torch.randn(2, 16, 5, 7), torch.randn(2, 8)
    with torch.no_grad():
        want = parent["block"](x, temb)
        assert km.apply_kernels(parent)["group_norm_silu"].count == 1
        assert type(parent["block"].norm1) is km.GroupNormSiLU
        fused = torch.compile(parent["block"], fullgraph=True)
        for layout in (torch.contiguous_format, torch.channels_last):
            got = fused(x.contiguous(memory_format=layout), temb)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_modules_with_offload_hooks_are_left_alone():
    from accelerate.hooks import ModelHook, add_hook_to_module
    from diffusers.models.resnet import ResnetBlock2D

    parent = torch.nn.ModuleDict({"block": ResnetBlock2D(in_channels=8, temb_channels=None, groups=4)})
    add_hook_to_module(parent["block"], ModelHook())
    use = km.apply_kernels(parent)["group_norm_silu"]
    assert use.count == 0 and use.left == {"hooks installed": ["block"]}


def _ctx(config: CompileConfig, family: str, components: dict) -> PassContext:
    return PassContext(components=components, family=get_family(family), device=torch.device("cpu"), config=config,
                       report=OptimizationReport("x", "cpu"))


def test_pass_skips_with_reasons():
    unet = diffusers.UNet2DConditionModel.from_pretrained(ensure_tiny_model("sdxl"), subfolder="unet")
    # O2 on a CPU: "auto" is off
    ctx = _ctx(config_for_level("O2"), "sdxl", {"unet": unet})
    apply_kernels_pass(ctx)
    assert ctx.report.status("kernels") == "skipped" and "auto: device is cpu" in ctx.report.details("kernels")[0]
    # an exported denoiser cannot hold custom ops
    ctx = _ctx(CompileConfig(kernels=True, backend="onnxruntime"), "sdxl", {"unet": unet})
    apply_kernels_pass(ctx)
    assert "ONNX" in ctx.report.details("kernels")[0] and km.kernel_count(unet) == 0
    # O0: disabled
    ctx = _ctx(config_for_level("O0"), "sdxl", {"unet": unet})
    apply_kernels_pass(ctx)
    assert ctx.report.details("kernels") == ["disabled in config"]


def test_pass_without_triton_reports_it(monkeypatch):
    from engine.kernels import runtime

    monkeypatch.setattr(runtime, "triton_installed", lambda: False)
    report = Engine(device="cpu", compile_config={"kernels": True}).optimization_report("tiny-sdxl")
    assert report.status("kernels") == "skipped"
    assert report.details("kernels") == ["triton not installed (pip install 'engine[kernels]')"]


def test_engine_imports_and_plans_without_importing_triton():
    code = ("import sys; import engine, engine.compiler, engine.kernels; "
            "from engine.compiler.plan import plan_compilation; from engine.compiler import config_for_level; "
            "from engine.runtime.device import simulated_caps; "
            "assert plan_compilation(config_for_level('O2'), simulated_caps('sm_80'), 'flux').kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.parametrize("caps,level,want", [
    ("sm_80", "O2", (True, "auto on cuda sm_80")),
    ("sm_75", "O3", (True, "auto on cuda sm_75")),
    ("cpu", "O2", (False, "auto: device is cpu")),
    ("sm_90", "O1", (False, "disabled in config")),
])
def test_plan_turns_kernels_on_for_cuda_at_o2_o3(caps, level, want):
    plan = plan_compilation(config_for_level(level), simulated_caps(caps), "flux")
    assert plan.kernels is want[0] and plan.kernels_note.startswith(want[1])
    assert plan_compilation(config_for_level("O1", kernels=True), simulated_caps("cpu"), "sdxl").kernels
