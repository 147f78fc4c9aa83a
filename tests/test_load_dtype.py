"""Models are read straight into their compute dtype: no fp32 copy of a half-precision checkpoint, per-component
rules (fp32 VAE / T5 under fp16) applied at load, and host memory that stays near the weights' size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.compiler import CompileConfig
from engine.compiler.dtype import DtypePolicy, dtype_policy
from engine.loading import load_model
from engine.loading.tiny import build_tiny_components, save_as_diffusers_folder

CPU = torch.device("cpu")


class _Fp32Watch(TorchDispatchMode):
    """Records every op on a real device that produces a large fp32 tensor (an upcast copy of weights)."""

    def __init__(self, min_numel: int = 4096):
        super().__init__()
        self.min_numel = min_numel
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta"
                    and t.numel() >= self.min_numel):
                self.seen.append(f"{func}: {tuple(t.shape)}")
        return out


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def half_folder(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny model saved in bf16, as half-precision checkpoints on the hub are."""
    parts = build_tiny_components(request.param)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.to(torch.bfloat16)
    folder = tmp_path_factory.mktemp(f"bf16-{request.param}") / "model"
    save_as_diffusers_folder(request.param, parts, folder)
    return request.param, folder


def test_policy_rules():
    fp16 = DtypePolicy(torch.float16)
    assert fp16("vae", "AutoencoderKL", {"force_upcast": True}) == torch.float32
    assert fp16("vae", "AutoencoderKL", {"force_upcast": False}) == torch.float16
    assert fp16("text_encoder_2", "T5EncoderModel", {}) == torch.float32
    assert fp16("text_encoder", "CLIPTextModel", {}) == torch.float16
    assert fp16("transformer", "FluxTransformer2DModel", {}) == torch.float16
    bf16 = DtypePolicy(torch.bfloat16)
    assert {bf16(n, c, {"force_upcast": True}) for n, c in
            [("vae", "AutoencoderKL"), ("text_encoder_2", "T5EncoderModel"), ("unet", "UNet2DConditionModel")]} == {
        torch.bfloat16}
    assert DtypePolicy(torch.bfloat16, vae_dtype="fp32")("vae", "AutoencoderKL", {}) == torch.float32
    assert DtypePolicy(torch.bfloat16, text_encoder_dtype="fp32")("text_encoder", "CLIPTextModel", {}) == torch.float32
    assert dtype_policy(CompileConfig(dtype="fp32"), CPU).compute == torch.float32
    assert dtype_policy(CompileConfig(dtype="bf16"), CPU).compute == torch.bfloat16


def test_half_checkpoint_is_never_upcast(half_folder):
    family, folder = half_folder
    watch = _Fp32Watch()
    with watch:
        loaded = load_model(str(folder), torch_dtype=DtypePolicy(torch.bfloat16))
    assert watch.seen == [], watch.seen[:5]
    for name, module in loaded.components.items():
        if isinstance(module, torch.nn.Module):
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name


def test_fp16_policy_applies_per_component_rules_at_load(half_folder):
    family, folder = half_folder
    loaded = load_model(str(folder), torch_dtype=DtypePolicy(torch.float16))
    dtypes = {n: next(m.parameters()).dtype for n, m in loaded.components.items() if isinstance(m, torch.nn.Module)}
    assert dtypes["vae"] == torch.float32  # force_upcast
    assert dtypes[loaded.family.denoiser] == torch.float16
    assert dtypes["text_encoder"] == torch.float16
    assert dtypes["text_encoder_2"] == (torch.float32 if family == "flux" else torch.float16)  # T5 stays fp32


def test_engine_loads_in_the_planned_dtype_and_reports_no_cast():
    from engine import Engine

    eng = Engine(device="cpu", compile_config={"dtype": "bf16"})
    loaded = eng.load("tiny-sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert next(loaded.components[name].parameters()).dtype == torch.bfloat16, name
    detail = eng.optimization_report("tiny-sdxl").details("dtype")[0]
    assert "loaded in these dtypes" in detail and "cast after loading" not in detail


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, psutil, torch
    from engine.compiler.dtype import DtypePolicy
    from engine.loading import load_model

    def high_water():  # VmHWM belongs to this process image (ru_maxrss would carry the forking parent's over exec)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    base = psutil.Process().memory_info().rss
    assert high_water() < base + 64 * 2**20  # nothing big happened before the load
    loaded = load_model(sys.argv[1], torch_dtype=DtypePolicy(torch.bfloat16))
    peak = high_water()
    weights = sum(p.numel() * p.element_size() for m in loaded.components.values()
                  if isinstance(m, torch.nn.Module) for p in m.parameters())
    print(json.dumps({"base": base, "peak": peak, "weights": weights}))
""")


def test_peak_host_memory_of_a_mid_size_bf16_load(tmp_path):
    """~190 M parameters in bf16 (a widened tiny-SDXL UNet): the load's peak RSS stays within 1.15x the weights
    plus a fixed 150 MiB (imports of the model classes, tokenizers) - an fp32 detour would need 3x."""
    from diffusers import UNet2DConditionModel

    parts = build_tiny_components("sdxl")
    config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    config.update(block_out_channels=[320, 640], attention_head_dim=[5, 10], transformer_layers_per_block=[1, 4])
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(**config)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.to(torch.bfloat16)
    save_as_diffusers_folder("sdxl", parts, tmp_path / "model")
    del parts
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "model")], capture_output=True,
                         text=True, timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights"] > 300 * 2**20
    assert m["peak"] - m["base"] <= 1.15 * m["weights"] + 150 * 2**20, m


def test_nf4_memory_plan_asks_the_loaders_for_bitsandbytes_weights(monkeypatch, half_folder):
    """NF4 weights only come out of the loader (bitsandbytes quantizes while loading); CUDA-only, so here the
    selection is checked: which components get which quantization_config, and that the loader passes it on."""
    import diffusers
    import transformers

    from engine.runtime.memory import plan_for_model
    from engine.runtime.planner import Planner

    family, folder = half_folder
    model = "flux-dev" if family == "flux" else "sdxl"
    plan = plan_for_model(model, max_memory="80GB", allow_lossy=True)
    plan = type(plan)(**{**plan.__dict__, "storage": "nf4", "rung": "nf4+resident", "lossy": True})
    policy = Planner.load_policy(DtypePolicy(torch.bfloat16), plan)
    denoiser = "transformer" if family == "flux" else "unet"
    assert set(policy.nf4_components) == {denoiser, "text_encoder", "text_encoder_2"}
    assert Planner.load_policy(DtypePolicy(torch.bfloat16), plan_for_model(model, max_memory="80GB")).nf4_components == ()

    made = []

    class FakeConfig:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(diffusers, "BitsAndBytesConfig", FakeConfig, raising=False)
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", FakeConfig, raising=False)
    seen = {}
    for cls in {type(m) for m in load_model(str(folder)).components.values() if isinstance(m, torch.nn.Module)}:
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen[klass.__name__] = kwargs.get("quantization_config")
            kwargs.pop("quantization_config", None)  # no bitsandbytes here: load plainly
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(folder), torch_dtype=policy)
    quantized = {name for name, q in seen.items() if isinstance(q, FakeConfig)}
    denoiser_class = "FluxTransformer2DModel" if family == "flux" else "UNet2DConditionModel"
    assert denoiser_class in quantized and "AutoencoderKL" not in quantized and len(quantized) >= 2, seen
    assert all(k == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
               for k in made)
