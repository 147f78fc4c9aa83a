"""Memory planner and placement: plans from the shipped configs on the meta device (no weights, no downloads), and
the placement hooks exercised on tiny models with the CPU as onload device."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from engine.errors import InsufficientMemoryError, InvalidRequestError
from engine.families import get_family
from engine.loading.tiny import build_tiny_components
from engine.paths import configs_dir
from engine.runtime import memory
from engine.runtime.memory import (
    GB,
    MemoryBudget,
    PlanRequest,
    next_plan,
    parse_memory,
    plan_for_model,
    plan_memory,
    replan_request,
    size_model,
    sizes_from_components,
)
from engine.runtime.placement import apply_memory_plan, encode_scope, offload_text_encoders, reset_placement

# Which plan each model gets on common cards, bf16 at its default size (the table in benchmarks/results).
EXPECTED_TABLE = {
    "sd15": ["resident"] * 6,
    "sdxl": ["text_encoders_offloaded"] + ["resident"] * 5,
    "flux-dev": ["group_offload"] * 4 + ["resident"] * 2,
    "flux-schnell": ["group_offload"] * 4 + ["resident"] * 2,
}
CARDS = (8, 12, 16, 24, 48, 80)


def _plan(model: str, gb: float, **kw) -> memory.MemoryPlan:
    return plan_for_model(model, max_memory=f"{gb}GB", **kw)


@pytest.mark.parametrize("model", list(EXPECTED_TABLE))
def test_plan_table(model):
    rungs = [_plan(model, gb).rung for gb in CARDS]
    assert rungs == EXPECTED_TABLE[model]
    for gb in CARDS:
        plan = _plan(model, gb)
        assert plan.peak_bytes <= gb * GB
        assert all(r.peak_bytes > gb * GB for r in plan.rejected)  # every richer plan was rejected on numbers


# Published parameter counts (rounded), and the arch folder / component that holds them.
PUBLISHED = [
    ("flux-dev", "transformer", 11.90e9),
    ("flux-dev", "text_encoder_2", 4.76e9),
    ("sdxl", "unet", 2.57e9),
    ("sdxl", "text_encoder", 123e6),
    ("sd15", "unet", 860e6),
]


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux-dev", "flux-schnell"])
def test_component_bytes_match_parameter_counts(arch):
    from engine.loading.single_file import build_meta_component

    for dtype, itemsize in ((torch.bfloat16, 2), (torch.float32, 4)):
        sizes = size_model(arch, dtype).components
        assert {c.name for c in sizes} >= {"vae", "text_encoder"}
        for size in sizes:
            module = build_meta_component(configs_dir() / "arch" / arch, size.name)
            numel = sum(p.numel() for p in module.parameters())  # independent count: the meta model itself
            assert size.params == numel
            assert size.bytes == pytest.approx(numel * itemsize, rel=0.02)


@pytest.mark.parametrize("arch,component,published", PUBLISHED)
def test_parameter_counts_match_published_numbers(arch, component, published):
    size = next(c for c in size_model(arch).components if c.name == component)
    assert size.params == pytest.approx(published, rel=0.01)


def test_fp16_keeps_t5_and_vae_fp32():
    sizes = {c.name: c for c in size_model("flux-dev", torch.float16).components}
    assert sizes["transformer"].dtype == "fp16" and sizes["text_encoder_2"].dtype == "fp32"
    assert sizes["vae"].dtype == "fp32"  # force_upcast in the FLUX VAE config


def test_flux_and_sdxl_thresholds():
    assert _plan("flux-dev", 24, dtype="bf16").rung != "resident"
    assert _plan("flux-dev", 80, dtype="bf16").rung == "resident"
    assert _plan("sdxl", 12, dtype="bf16").rung == "resident"


def test_lossy_rungs_only_with_allow_lossy():
    # 24 GB card, 16 GB of RAM: group offload needs all 33.7 GB of weights in host RAM
    with pytest.raises(InsufficientMemoryError, match="allow_lossy"):
        _plan("flux-dev", 24, max_host_memory="16GB")
    plan = _plan("flux-dev", 24, max_host_memory="16GB", allow_lossy=True)
    assert plan.lossy and plan.storage_dtype == "fp8" and plan.rung == "fp8+resident"
    assert plan.weights_bytes < size_model("flux-dev").weights_bytes * 0.7
    for gb in CARDS:  # without the permission no lossy rung is even considered
        plan = _plan("flux-dev", gb)
        assert not plan.lossy and not any(r.rung.startswith(("fp8", "int8", "nf4")) for r in plan.rejected)


def test_no_fit_names_the_smallest_budget():
    with pytest.raises(InsufficientMemoryError) as info:
        _plan("flux-dev", 1)
    err = info.value
    assert err.needed_bytes > 1 * GB and err.budget_bytes == 1 * GB
    assert "needs" in str(err) and "GB" in str(err)
    assert _plan("flux-dev", err.needed_bytes / GB + 0.01).rung == "group_offload"  # that budget is enough
    assert err.to_dict()["error_type"] == "insufficient_memory"


def test_large_images_and_batches_turn_on_tiling_and_slicing():
    default = _plan("sdxl", 12)
    assert not default.vae_tiling and not default.vae_slicing
    big = _plan("sdxl", 12, width=2048, height=2048)
    assert big.vae_tiling and big.rung == "resident"  # fits where the weights fit
    batch = _plan("sdxl", 12, num_images=8)
    assert batch.vae_slicing and batch.rung == "resident"
    flux_big = _plan("flux-dev", 48, width=2048, height=2048, num_images=8)
    assert flux_big.vae_tiling and flux_big.vae_slicing
    # without tiling, decoding 2048x2048 would be 4x the 1024x1024 decode
    sizes = size_model("sdxl")
    untiled = memory.estimate_activations(sizes, PlanRequest(2048, 2048))
    tiled = memory.estimate_activations(sizes, PlanRequest(2048, 2048), tiling=True)
    assert tiled.decode < untiled.decode / 3


def test_next_plan_steps_down_and_stops():
    plan = _plan("flux-dev", 80)
    lower = next_plan(plan)
    assert lower.rung == "text_encoders_offloaded" and lower.peak_bytes < plan.peak_bytes
    bottom = _plan("flux-dev", 24)
    with pytest.raises(InsufficientMemoryError):
        next_plan(bottom)  # group offload is the last lossless rung
    lossy = next_plan(_plan("flux-dev", 24, allow_lossy=True))
    assert lossy.lossy and lossy.peak_bytes < bottom.peak_bytes


def test_replan_request_keeps_the_rung():
    plan = _plan("sdxl", 12)
    big = replan_request(plan, PlanRequest(2048, 2048))
    assert big.rung == plan.rung and big.vae_tiling
    with pytest.raises(InsufficientMemoryError):
        replan_request(_plan("sdxl", 8), PlanRequest(4096, 4096, num_images=16, flash_attention=False))


def test_plan_report_and_dict():
    plan = _plan("flux-dev", 24)
    lines = plan.describe()
    assert lines[0].startswith("memory plan: group_offload for flux-dev")
    assert any(line.startswith("  rejected resident: peak") for line in lines)
    assert any("transformer" in line and "11,901" in line for line in lines)
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["rung"] == "group_offload" and data["host_bytes"] == plan.weights_bytes
    assert {c["name"] for c in data["components"]} == {"transformer", "text_encoder", "text_encoder_2", "vae"}


def test_storage_needs_its_package(monkeypatch):
    monkeypatch.setattr(memory, "_installed", lambda package: package != "bitsandbytes")
    plan = _plan("flux-dev", 2, allow_lossy=True)  # below group offload's 2.5 GB: lossy group offload
    assert plan.rung == "fp8+group_offload"
    with pytest.raises(InsufficientMemoryError, match="nf4 needs bitsandbytes|no memory plan"):
        plan_memory(plan.sizes, plan.request, plan.budget, allow_lossy=True, start="nf4+resident")


def test_cpu_device_plans_resident_only():
    sizes = size_model("sdxl")
    plan = plan_memory(sizes, PlanRequest(1024, 1024), MemoryBudget(64 * GB, None, "cpu"))
    assert plan.rung == "resident"
    with pytest.raises(InsufficientMemoryError):
        plan_memory(sizes, PlanRequest(1024, 1024), MemoryBudget(4 * GB, None, "cpu"))


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("12000MB", 12 * 10**9),
                                           ("1.5 gb", 1_500_000_000), (123456, 123456), ("8g", 8 * 10**9)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", 0, "12 XB"])
def test_parse_memory_rejects(bad):
    with pytest.raises(InvalidRequestError):
        parse_memory(bad)


def test_tiny_and_aurasr_models_are_sizable():
    for name, family in (("sdxl", "sdxl"), ("flux", "flux")):
        from_config = {c.name: c for c in size_model(f"tiny-{name}", torch.float32).components}
        built = sizes_from_components(f"tiny-{name}", family, _tiny_cached(name))
        assert {c.name: c.bytes for c in built.components} == {k: c.bytes for k, c in from_config.items()}
    aura = size_model("aura-sr").components[0]
    assert aura.role == "upsampler" and aura.params == pytest.approx(617.6e6, rel=0.01)
    assert plan_for_model("aura-sr", max_memory="8GB").rung == "resident"


# ----------------------------------------------------------------------------------------------- placement (CPU)
@functools.lru_cache(maxsize=None)
def _tiny_cached(name: str) -> dict:
    return build_tiny_components(name)


def _tiny(name: str) -> dict:
    """A private copy of the (built once) tiny components."""
    return _copy(_tiny_cached(name))


def _copy(components: dict) -> dict:
    return {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}


def _tiny_plan(components: dict, family: str, rung: str, request: PlanRequest | None = None) -> memory.MemoryPlan:
    """The plan of `rung` for a CUDA-sized budget, applied below with the CPU as onload device."""
    sizes = sizes_from_components(f"tiny-{family}", family, components)
    return memory.plan_at(sizes, request or PlanRequest(64, 64), MemoryBudget(10**12, None, "cuda"), rung)


def _run(components: dict, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Text encoders -> denoiser -> VAE decode in the pipeline's order, so swap hooks hand the device over."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (1, 8), generator=g)
    with torch.no_grad():
        if family == "sdxl":
            h1 = components["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
            out2 = components["text_encoder_2"](ids, output_hidden_states=True)
            cond = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
            sample = torch.randn(1, 4, 16, 16, generator=g)
            added = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            latents = components["unet"](sample, 10, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        else:
            pooled = components["text_encoder"](ids).pooler_output
            text = components["text_encoder_2"](ids)[0]
            tokens = torch.randn(1, 64, 16, generator=g)
            img_ids = torch.zeros(64, 3)
            img_ids[:, 1] = torch.arange(64) // 8
            img_ids[:, 2] = torch.arange(64) % 8
            out = components["transformer"](hidden_states=tokens, encoder_hidden_states=text,
                                            pooled_projections=pooled, timestep=torch.tensor([0.5]),
                                            img_ids=img_ids, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
            latents = out.sample.view(1, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 16, 16)
        image = components["vae"].decode(latents).sample
    return latents, image


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def tiny(request):
    return request.param, _tiny_cached(request.param), _run(_tiny(request.param), request.param)


@pytest.mark.parametrize("rung", ["text_encoders_offloaded", "model_offload", "group_offload"])
def test_placement_matches_plain_run(tiny, rung):
    family, components, (ref_latents, ref_image) = tiny
    placed = _copy(components)
    plan = _tiny_plan(placed, family, rung)
    assert plan.rung == rung and [r.rung for r in plan.rejected][-1:] != [rung]
    notes = apply_memory_plan(placed, get_family(family), plan, "cpu")
    assert notes and rung in notes[0]
    for _ in range(2 if plan.placement == "swap" else 1):  # swap: twice, the cyclic hooks hand over again
        latents, image = _run(placed, family)
        torch.testing.assert_close(latents, ref_latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-5)
    reset_placement(placed)
    modules = [m for v in placed.values() if isinstance(v, torch.nn.Module) for m in v.modules()]
    assert not any(hasattr(m, "_hf_hook") for m in modules)
    assert not any(getattr(m, "_diffusers_hook", None) is not None
                   and m._diffusers_hook.get_hook("group_offloading") is not None for m in modules)


def test_swap_hooks_are_chained_in_a_cycle():
    components = _tiny("sdxl")
    plan = _tiny_plan(components, "sdxl", "text_encoders_offloaded")
    apply_memory_plan(components, get_family("sdxl"), plan, "cpu")
    te_prev = components["text_encoder"]._hf_hook.prev_module_hook
    unet_prev = components["unet"]._hf_hook.prev_module_hook
    assert {id(h.model) for h in te_prev.handles} == {id(components["unet"]), id(components["vae"])}
    encoders = {id(components["text_encoder"]), id(components["text_encoder_2"])}
    assert {id(h.model) for h in unet_prev.handles} == encoders
    assert components["vae"]._hf_hook.prev_module_hook is None  # same group as the UNet
    assert components["text_encoder_2"]._hf_hook.prev_module_hook is None
    scope = encode_scope(components, plan)
    assert scope is not None
    with scope():
        pass
    assert offload_text_encoders(components) == ["text_encoder", "text_encoder_2"]
    assert encode_scope(components, _tiny_plan(components, "sdxl", "resident")) is None


def test_tiled_decode_equals_diffusers_tiling():
    components = _tiny("sdxl")
    vae = components["vae"]
    assert vae.tile_latent_min_size == 16  # sample_size 128 over 3 downsamplings: 24x24 latents tile
    latents = torch.randn(2, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(vae)
    reference.enable_tiling()
    reference.enable_slicing()  # the plan slices a batch of 8 too
    with torch.no_grad():
        expected = reference.decode(latents).sample
        untiled = copy.deepcopy(vae).decode(latents).sample
    placed = _copy(components)
    plan = _tiny_plan(placed, "sdxl", "resident", PlanRequest(2048, 2048, num_images=8))
    assert plan.vae_tiling and plan.vae_slicing
    notes = apply_memory_plan(placed, get_family("sdxl"), plan, "cpu")
    assert "vae tiling on" in notes and "vae slicing on" in notes
    with torch.no_grad():
        got = placed["vae"].decode(latents).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, untiled, atol=1e-4)  # tiling really ran (seams blended differently)


@pytest.mark.parametrize("rung", ["fp8+resident", "fp8+group_offload", "int8+model_offload"])
def test_lossy_storage_runs(rung):
    components = _tiny("flux")
    _, ref = _run(_tiny("flux"), "flux")
    plan = _tiny_plan(components, "flux", rung)
    notes = apply_memory_plan(components, get_family("flux"), plan, "cpu")
    assert notes[0].startswith(f"storage {plan.storage}:")
    if plan.storage == "fp8":
        proj = components["transformer"].transformer_blocks[0].attn.to_q
        assert proj.weight.dtype == torch.float8_e4m3fn
        assert components["vae"].decoder.conv_in.weight.dtype == torch.float32  # the VAE keeps its dtype
    latents, image = _run(components, "flux")
    assert torch.isfinite(image).all()
    assert (image - ref).abs().mean() < 0.2  # lossy, not broken
    assert memory.needs_reload(plan, _tiny_plan(components, "flux", "resident"))


def test_nf4_without_bitsandbytes_weights_is_an_error():
    from engine.errors import ModelLoadError

    components = _tiny("flux")
    plan = _tiny_plan(components, "flux", "nf4+resident")
    with pytest.raises(ModelLoadError, match="load time"):
        apply_memory_plan(components, get_family("flux"), plan, "cpu")


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_plan(capsys):
    from engine.cli import main

    assert main(["plan", "--model", "flux-dev", "--max-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: group_offload for flux-dev" in out and "rejected resident" in out
    assert main(["plan", "--model", "sdxl", "--max-memory", "12GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rung"] == "resident"
    assert main(["plan", "--model", "flux-dev", "--max-memory", "1GB"]) == 2
    assert "needs" in capsys.readouterr().err


def test_cli_plan_table(capsys, tmp_path):
    from engine.cli import main

    out_file = tmp_path / "plans.md"
    assert main(["plan", "--table", "--out", str(out_file)]) == 0
    text = out_file.read_text()
    assert text.startswith(f"`engine plan --table --out {out_file}`")
    for model, rungs in EXPECTED_TABLE.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {model} ("))
        assert [cell.split(" (")[0] for cell in row.strip("| ").split(" | ")[1:]] == rungs
    shipped = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "memory_plans.md"
    if shipped.is_file():  # the committed table is what the command prints today
        assert memory.markdown_table(memory.plan_table()) in shipped.read_text()
