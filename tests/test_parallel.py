"""Multi-GPU for one request: CFG-parallel for SD 1.5 / SDXL (engine/scaleout/cfg_parallel.py, compiler pass
`parallel`), selected from capabilities and reported with the reason when it is not applied.

On a CPU the mechanism runs for real with `parallel_devices=("cpu", "cpu")`: each UNet batch is split in halves, the
second half runs on a copy of the UNet from a worker thread, the outputs are joined. Its images equal the unsplit
engine's (and stock diffusers') in fp32, for guidance on and off, several images, img2img, ControlNet, IP-Adapter and
LoRAs (loaded, swapped, fused, removed: the copy follows), at O0, O1 and O2 (regional compile: the copy's blocks are
compiled again)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch

from conftest import images_close
from engine import Engine
from engine.compiler import CompileConfig, OptimizationReport
from engine.compiler.context import PassContext
from engine.compiler.parallel import apply_parallel_plan
from engine.compiler.plan import caps_for, plan_compilation
from engine.families import get_family
from engine.loading.tiny import ensure_tiny_model
from engine.scaleout.cfg_parallel import attach_cfg_parallel, split_batch
from engine.scaleout.parallel import ParallelCaps, plan_parallel

CPU2 = ["cpu", "cpu"]
KW = dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=7)
LEVELS = {  # fp32 everywhere: the split must not change a value beyond batch-size rounding
    "O0": ("O0", {}),
    "O1": ("O1", {"dtype": "fp32"}),
    "O2": ("O2", {"dtype": "fp32", "compile_vae": False}),
}


def arr(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def same(a, b, what):
    ok, frac = images_close(a, b)
    assert ok, f"{what}: only {frac:.4%} of values within one level of the unsplit engine"


# -- selection on simulated capabilities -----------------------------------------------------------------------------

def test_selection_on_simulated_capabilities():
    two = plan_parallel("sdxl", ParallelCaps("cuda", 2))
    assert (two.kind, two.degree) == ("cfg", 2) and "2 of 2 GPUs" in two.reason
    assert plan_parallel("sd15", ParallelCaps("cuda", 8)).kind == "cfg"
    off = plan_parallel("sdxl", ParallelCaps("cuda", 2), uses_cfg=False)
    assert off.kind == "single" and "guidance" in off.reason
    one = plan_parallel("sdxl", ParallelCaps("cuda", 1))
    assert one.kind == "single" and "one GPU" in one.reason
    cpu = plan_parallel("sd15", ParallelCaps("cpu", 0))
    assert cpu.kind == "single" and "CUDA" in cpu.reason


def _pass_report(family: str, config: CompileConfig, caps: ParallelCaps | None, device: str = "cpu", **state):
    """The parallel pass alone on the tiny model's real denoiser (no device work unless it applies)."""
    from engine.loading import load_model

    loaded = load_model(f"tiny-{family}")
    report = OptimizationReport(config_hash="test", device=device)
    ctx = PassContext(components=loaded.components, family=get_family(family), device=torch.device(device),
                      config=config, report=report, state={"parallel_caps": caps, **state} if caps else dict(state))
    apply_parallel_plan(ctx)
    return report, ctx.state


@pytest.mark.parametrize("family, caps, status, words", [
    ("sdxl", ParallelCaps("cuda", 1), "skipped", "one GPU"),
    ("sd15", ParallelCaps("cpu", 0), "skipped", "needs CUDA"),
    ("flux", ParallelCaps("cuda", 4, nvlink=True, attention_heads=2), "skipped", "torch.distributed"),
    ("flux", ParallelCaps("cpu", 0), "skipped", "needs CUDA"),
])
def test_the_pass_reports_why_it_is_not_applied(family, caps, status, words):
    report, state = _pass_report(family, CompileConfig(), caps)
    assert report.status("parallel") == status and words in " ".join(report.details("parallel"))
    assert "cfg_parallel" not in state


@pytest.mark.parametrize("device, caps, words", [
    ("cpu", ParallelCaps("cuda", 2), "engine runs on cpu"),  # Engine(device="cpu") on a 2-GPU host
    ("cuda:0", ParallelCaps("cuda", 2, distributed_ready=True, world_size=2), "torchrun"),  # a rank of torchrun
])
def test_automatic_cfg_parallel_needs_the_engines_own_gpu_and_no_torchrun(device, caps, words):
    report, state = _pass_report("sdxl", CompileConfig(), caps, device=device)
    assert report.status("parallel") == "skipped" and words in " ".join(report.details("parallel"))
    assert "cfg_parallel" not in state


def test_the_second_device_is_another_gpu_than_the_engines():
    from engine.compiler.parallel import _second_device

    assert _second_device(torch.device("cuda", 0), 2) == torch.device("cuda", 1)
    assert _second_device(torch.device("cuda", 1), 2) == torch.device("cuda", 0)
    assert _second_device(torch.device("cuda"), 4) == torch.device("cuda", 1)
    assert all(_second_device(torch.device("cuda", i), n) != torch.device("cuda", i)
               for n in range(2, 9) for i in range(n))


def test_the_pass_on_this_machine_and_its_switches():
    if torch.cuda.device_count() < 2:
        report, _ = _pass_report("sdxl", CompileConfig(), None)
        assert report.status("parallel") == "skipped"
        assert "CUDA" in report.details("parallel")[0] or "one GPU" in report.details("parallel")[0]
    report, _ = _pass_report("sdxl", CompileConfig(parallel="off", parallel_devices=("cpu", "cpu")), None)
    assert "disabled in config" in report.details("parallel")[0]
    report, _ = _pass_report("flux", CompileConfig(parallel_devices=("cpu", "cpu")), None)
    assert report.status("parallel") == "skipped" and "UNet families" in report.details("parallel")[0]
    report, _ = _pass_report("sdxl", CompileConfig(parallel_devices=("cuda:0", "cuda:1")), None)
    assert report.status("parallel") == "skipped" and "engine's device" in report.details("parallel")[0]
    plan = SimpleNamespace(offloads=True, lossy=False, rung="model_offload", storage="compute")
    report, state = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None, memory_plan=plan)
    assert report.status("parallel") == "skipped" and "model_offload" in report.details("parallel")[0]
    lossy = SimpleNamespace(offloads=False, lossy=True, rung="fp8+resident", storage="fp8")
    report, _ = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None, memory_plan=lossy)
    assert report.status("parallel") == "skipped" and "fp8" in report.details("parallel")[0]
    report, _ = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None,
                             backend={"unet": "onnxruntime"})
    assert report.status("parallel") == "skipped" and "exported onnxruntime" in report.details("parallel")[0]
    forced = CompileConfig(compile=True, parallel_devices=("cpu", "cpu"))
    regional = plan_compilation(forced, caps_for(torch.device("cpu")), get_family("sdxl"))
    whole = dataclasses.replace(regional, compile_scope="whole")
    report, _ = _pass_report("sdxl", forced, None, compiled=True, plan=whole)
    assert report.status("parallel") == "skipped" and "cuda_graphs" in report.details("parallel")[0]
    report, state = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None)
    assert report.status("parallel") == "applied" and state["cfg_parallel"].replica is not None
    state["cfg_parallel"].remove()


def test_the_unet_copy_is_checked_against_the_second_devices_free_memory(monkeypatch):
    """Real SDXL sized on the meta device (bf16, 1024x1024, resident on an 80 GB card): the copy on the second GPU
    needs the UNet (~5 GB) and one CFG branch's activations; a second GPU with less free is reported, not filled."""
    import engine.compiler.parallel as pp
    from engine.runtime.memory import GB, MemoryBudget, PlanRequest, estimate_activations, plan_memory, size_model

    plan = plan_memory(size_model("sdxl"), PlanRequest(1024, 1024), MemoryBudget(80 * GB, None, "cuda"))
    need = pp.copy_need_bytes(plan)
    unet = next(c.bytes for c in plan.components if c.role == "denoiser")
    both = estimate_activations(plan.sizes, plan.request).denoise
    assert 4.5 * GB < unet < need < unet + both and 2 * (need - unet) == pytest.approx(both, rel=0.01)
    monkeypatch.setattr(pp, "free_bytes", lambda device: need - 1)
    report, state = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None, memory_plan=plan)
    detail = " ".join(report.details("parallel"))
    assert report.status("parallel") == "skipped" and "free" in detail and "1024x1024" in detail, detail
    assert "cfg_parallel" not in state
    monkeypatch.setattr(pp, "free_bytes", lambda device: need)
    report, state = _pass_report("sdxl", CompileConfig(parallel_devices=("cpu", "cpu")), None, memory_plan=plan)
    assert report.status("parallel") == "applied"
    state["cfg_parallel"].remove()
    monkeypatch.undo()
    assert pp.free_bytes(torch.device("cpu")) is None and pp.copy_need_bytes(None) is None


def test_parallel_devices_are_validated():
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        Engine(device="cpu", compile_config={"parallel_devices": ["gpu0", "cpu"]})
    assert "parallel_devices" in info.value.field


# -- the split itself, on the UNet's arguments ---------------------------------------------------------------------

def _unet(family: str) -> torch.nn.Module:
    return diffusers.UNet2DConditionModel.from_pretrained(ensure_tiny_model(family), subfolder="unet").eval()


def _unet_inputs(unet, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    kwargs = {"sample": torch.randn(batch, c.in_channels, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(batch, 5, c.cross_attention_dim, generator=g)}
    if c.addition_embed_type == "text_time":
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return kwargs


def test_split_rule():
    t = torch.arange(4)
    first, second = split_batch({"a": t, "b": [t, torch.tensor(3.0)], "c": 0.5, "d": None, "e": torch.ones(1)}, 4)
    assert first["a"].tolist() == [0, 1] and second["b"][0].tolist() == [2, 3]
    assert first["b"][1] is second["b"][1] and first["c"] == 0.5 and first["d"] is None
    assert first["e"] is second["e"]  # dim 0 is not the batch: both halves get it whole


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_hooked_unet_equals_the_unet(family):
    """Positional and keyword calls, per-sample and 0-d timesteps, ControlNet residuals, both return shapes: the
    hooked UNet's output equals the plain UNet's (fp32, 1e-5); an odd batch runs unsplit; the copy ran in another
    thread; removing the hooks gives the plain UNet back."""
    import threading

    unet = _unet(family)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape) * 0.2)
    batch = 4
    kw = _unet_inputs(unet, batch)
    with torch.no_grad():
        down, mid = net(kw["sample"], 10, kw["encoder_hidden_states"], torch.rand(batch, 3, 64, 64),
                        added_cond_kwargs=kw.get("added_cond_kwargs"), return_dict=False)
        calls = [
            ((kw["sample"], torch.tensor(10.0), kw["encoder_hidden_states"]),
             {"added_cond_kwargs": kw.get("added_cond_kwargs"), "return_dict": False}),
            ((), {**kw, "timestep": torch.tensor([1.0, 5.0, 9.0, 13.0]), "return_dict": True}),
            ((), {**kw, "timestep": 20, "down_block_additional_residuals": down,
                  "mid_block_additional_residual": mid, "return_dict": False}),
        ]
        expected = [unet(*a, **k) for a, k in calls]
        handle = attach_cfg_parallel(unet, (torch.device("cpu"), torch.device("cpu")))
        got = [unet(*a, **k) for a, k in calls]
        odd = _unet_inputs(unet, 3, seed=1)
        odd_expected = handle.replica(**odd, timestep=10).sample
        odd_got = unet(**odd, timestep=10).sample
    for e, g in zip(expected, got):
        e, g = (e[0], g[0]) if isinstance(e, tuple) else (e.sample, g.sample)
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5, rtol=1e-5), (g - e).abs().max()
    assert torch.equal(odd_got, odd_expected)
    assert (handle.stats.split_calls, handle.stats.unsplit_calls) == (3, 1)
    assert handle.stats.replica_threads and threading.get_ident() not in handle.stats.replica_threads
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(unet.parameters(), handle.replica.parameters()))
    handle.remove()
    with torch.no_grad():
        assert torch.equal(unet(*calls[0][0], **calls[0][1])[0], expected[0][0])
    assert handle.stats.split_calls == 3


def test_the_copy_follows_the_unet():
    """A changed adapter key, or a new `encoder_hid_proj` (an IP-Adapter loaded for a job), rebuilds the copy
    before the next split call; a weight changed in place without either is exactly what the key is for."""
    unet = _unet("sd15")
    kw = _unet_inputs(unet, 2)
    handle = attach_cfg_parallel(unet, (torch.device("cpu"), torch.device("cpu")))
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.5)  # e.g. a LoRA fused into the weights
        stale = unet(**kw, timestep=3).sample
        handle.adapters_key = ("fused", 1)
        fresh = unet(**kw, timestep=3).sample
        handle.remove()
        plain = unet(**kw, timestep=3).sample
    assert handle.stats.rebuilds == 2
    assert torch.allclose(fresh, plain, atol=1e-5) and not torch.allclose(stale[1:], plain[1:], atol=1e-3)


# -- the engine: parallel images equal unsplit images ---------------------------------------------------------------

@pytest.fixture(scope="module")
def engines():
    built: dict[str, tuple[Engine, Engine]] = {}

    def get(level: str) -> tuple[Engine, Engine]:
        if level not in built:
            name, overrides = LEVELS[level]
            built[level] = (Engine(device="cpu", opt_level=name, compile_config=dict(overrides)),
                            Engine(device="cpu", opt_level=name,
                                   compile_config={**overrides, "parallel_devices": CPU2}))
        return built[level]

    return get


def handle_of(eng: Engine, model: str):
    return eng._slot(model).cfg_parallel


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_to_image_equals_unsplit(engines, family, level):
    plain, split = engines(level)
    model = f"tiny-{family}"
    report = split.optimization_report(model)
    assert report.status("parallel") == "applied", report.details("parallel")
    assert plain.optimization_report(model).status("parallel") == "skipped"
    if level == "O2":
        assert report.status("compile") == "applied" and "compiled again" in report.details("parallel")[0]
    stats = handle_of(split, model).stats
    for n, guidance, splits in ((1, 5.0, True), (2, 5.0, True), (1, 1.0, False), (2, 1.0, True)):
        before = stats.split_calls
        a = plain.generate(model=model, **KW, num_images=n, guidance_scale=guidance).images
        b = split.generate(model=model, **KW, num_images=n, guidance_scale=guidance).images
        same(a, b, f"{family} {level} n={n} guidance={guidance}")
        assert (stats.split_calls > before) == splits


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_o0_equals_stock_diffusers(engines, family):
    _, split = engines("O0")
    pipe = getattr(diffusers, get_family(family).stock_pipeline).from_pretrained(ensure_tiny_model(family))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(KW)
    seed = kw.pop("seed")
    theirs = pipe(**kw, guidance_scale=5.0, num_images_per_prompt=2,
                  generator=torch.Generator("cpu").manual_seed(seed)).images
    ours = split.generate(model=f"tiny-{family}", **KW, guidance_scale=5.0, num_images=2).images
    same(theirs, ours, f"{family} vs stock diffusers")


@pytest.mark.parametrize("level", ["O0", "O1"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_img2img_and_controlnet_equal_unsplit(engines, family, level):
    from test_controlnet import make_controlnet
    from test_img2img import random_image

    plain, split = engines(level)
    model = f"tiny-{family}"
    image = random_image(64, 64, seed=2)
    stats = handle_of(split, model).stats
    before = stats.split_calls
    args = dict(model=model, **KW, image=image, strength=0.75, num_images=2, guidance_scale=5.0)
    same(plain.generate(**args).images, split.generate(**args).images, f"{family} {level} img2img")
    net = make_controlnet(SimpleNamespace(unet=_unet(family)), family, seed=1)  # the unfused weights
    args = dict(model=model, **KW, num_images=2, guidance_scale=5.0,
                controlnets=[{"model": net, "image": random_image(64, 64, seed=4), "conditioning_scale": 0.8}])
    base = plain.generate(model=model, **KW, num_images=2, guidance_scale=5.0).images
    a, b = plain.generate(**args).images, split.generate(**args).images
    assert np.abs(arr(a) - arr(base)).mean() > 1.0, "the ControlNet has no effect: the test would prove nothing"
    same(a, b, f"{family} {level} controlnet")
    assert stats.split_calls > before


@pytest.mark.parametrize("level", list(LEVELS))
def test_loras_equal_unsplit_and_the_copy_follows(engines, level, tmp_path_factory):
    """LoRA on, swapped, fused (after `lora_fuse_after` identical requests), off: each image equals the unsplit
    engine's, and every change of the adapters rebuilt the copy (O2: slots hot-swapped, copy compiled again)."""
    from test_lora import make_lora

    pytest.importorskip("peft")
    d = tmp_path_factory.mktemp("parallel-loras")
    a, b = make_lora(d / "a.safetensors", 1), make_lora(d / "b.safetensors", 2, rank=8)
    plain, split = engines(level)
    model = "tiny-sdxl"
    args = dict(model=model, **KW, guidance_scale=5.0)
    base = split.generate(**args).images
    rebuilds = handle_of(split, model).stats.rebuilds
    steps = [[{"path": str(a)}], [{"path": str(b), "scale": 0.9}], [{"path": str(b), "scale": 0.9}],
             [{"path": str(b), "scale": 0.9}], []]
    for i, loras in enumerate(steps):
        x, y = plain.generate(**args, loras=loras).images, split.generate(**args, loras=loras).images
        same(x, y, f"{level} loras step {i}")
        if loras:
            assert np.abs(arr(y) - arr(base)).mean() > 1.0, "the LoRA has no effect: the test would prove nothing"
    assert np.array_equal(arr(y), arr(base))
    manager = split._slot(model).loras
    stats = handle_of(split, model).stats
    fused = LEVELS[level][0] != "O2"  # eager models fuse a stable set; compiled ones keep hot-swap slots
    assert stats.rebuilds - rebuilds == 3 + fused  # a, b, (b fused,) none
    assert not manager.fused and manager.active == ()


def test_ip_adapter_equals_unsplit(engines):
    """An IP-Adapter is loaded into the UNet for its job only: that job runs unsplit on the first device (no copy
    of the UNet is made for it, nor for the next plain job, which is split again); images equal the unsplit engine."""
    from test_img2img import random_image

    plain, split = engines("O0")
    for family in ("sd15", "sdxl"):
        model = f"tiny-{family}"
        args = dict(model=model, **KW, guidance_scale=5.0, num_images=2)
        ip = {"model": f"tiny-ip-adapter-{family}", "image": random_image(80, 72, seed=3), "scale": 0.8}
        stats = handle_of(split, model).stats
        before = stats.split_calls
        base = split.generate(**args).images
        per_job = stats.split_calls - before  # UNet calls of one job (the scheduler's, not always one per step)
        rebuilds, split_calls, unsplit = stats.rebuilds, stats.split_calls, stats.unsplit_calls
        a, b = plain.generate(**args, ip_adapter=ip).images, split.generate(**args, ip_adapter=ip).images
        assert np.abs(arr(a) - arr(base)).mean() > 1.0, "the IP-Adapter has no effect"
        same(a, b, f"{family} ip-adapter")
        assert per_job >= KW["num_inference_steps"]
        assert stats.unsplit_calls - unsplit == per_job and stats.split_calls == split_calls
        assert np.array_equal(arr(split.generate(**args).images), arr(base))
        assert stats.split_calls - split_calls == per_job
        assert stats.rebuilds == rebuilds, "an IP-Adapter job copied the UNet"


_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
_KERNEL_OOM = RuntimeError("CUDA error: out of memory")  # a kernel's (cuBLAS, cuDNN workspace), not the allocator's


@pytest.mark.parametrize("level, error", [("O0", _OOM), ("O1", _OOM), ("O1", _KERNEL_OOM), ("O2", _OOM)],
                         ids=["O0", "O1", "O1-kernel", "O2"])
def test_out_of_memory_on_the_second_device_finishes_the_job_unsplit(engines, level, error):
    """The copy's call raises torch.OutOfMemoryError (as a second GPU that filled up would): that half runs on the
    first device, the image equals the unsplit engine's, the copy is dropped, the report says why, and later jobs
    run unsplit without touching the engine's own memory ladder (the plan stays)."""
    plain = engines(level)[0]
    name, overrides = LEVELS[level]
    split = Engine(device="cpu", opt_level=name, compile_config={**overrides, "parallel_devices": CPU2})
    try:
        model = "tiny-sdxl"
        handle = handle_of(split, model)
        plan_before = list(split.optimization_report(model).memory_plan)

        def full(*args, **kwargs):
            raise error

        handle._run_replica = full
        want = plain.generate(model=model, **KW, num_images=2).images
        same(want, split.generate(model=model, **KW, num_images=2).images, f"{level} after the fallback")
        assert handle.stats.fallbacks == 1 and handle.replica is None and "out of memory" in handle.disabled
        report = split.optimization_report(model)
        assert report.status("parallel") == "skipped", report  # the entry says it was applied, and why no longer
        assert any("out of memory on cpu" in d and "unsplit" in d and "was:" in d
                   for d in report.details("parallel")), report
        assert report.memory_plan == plan_before
        splits = handle.stats.split_calls
        same(want, split.generate(model=model, **KW, num_images=2).images, f"{level} unsplit from then on")
        assert handle.stats.split_calls == splits and handle.stats.fallbacks == 1
    finally:
        split.close()


def test_other_errors_of_the_second_device_are_raised():
    """Only out-of-memory falls back; any other failure of the copy's call fails the job as it would unsplit."""
    split = Engine(device="cpu", opt_level="O0", compile_config={"parallel_devices": CPU2})
    try:
        handle = handle_of(split, "tiny-sdxl")

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        handle._run_replica = broken
        with pytest.raises(RuntimeError, match="illegal memory access"):
            split.generate(model="tiny-sdxl", **KW, num_images=2)
        assert handle.stats.fallbacks == 0 and handle.disabled is None
    finally:
        split.close()


def test_the_worker_runs_under_the_callers_modes():
    """Grad, inference and autocast modes are per thread: the copy's half runs under the caller's (a half without
    autocast would come back fp32 and promote the joined output)."""
    unet = _unet("sd15")
    kw = _unet_inputs(unet, 2)
    handle = attach_cfg_parallel(unet, (torch.device("cpu"), torch.device("cpu")))
    with torch.no_grad():
        assert not unet(**kw, timestep=3).sample.requires_grad
    with torch.inference_mode():
        assert unet(**kw, timestep=3).sample.is_inference()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet(**kw, timestep=3).sample.dtype == torch.bfloat16
    assert handle.stats.split_calls == 3
    handle.remove()


# -- on CUDA (skipped on a CPU): the real selection, and the split across GPU streams ---------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_split_equals_unsplit():
    """Auto selection on this machine's GPUs (applied on 2+, skipped with the reason on one), and the split forced
    onto the engine's GPU twice (exercises the worker thread and cross-stream ordering on one GPU); whole-model
    compile with CUDA graphs (O2's default on CUDA) reports why it does not compose."""
    count = torch.cuda.device_count()
    kw = dict(model="tiny-sdxl", **KW, guidance_scale=5.0, num_images=2)
    plain = Engine(device="cuda:0", opt_level="O1", compile_config={"dtype": "fp32", "parallel": "off"})
    auto = Engine(device="cuda:0", opt_level="O1", compile_config={"dtype": "fp32"})
    forced = Engine(device="cuda:0", opt_level="O1",
                    compile_config={"dtype": "fp32", "parallel_devices": ["cuda:0", "cuda:0"]})
    detail = auto.optimization_report("tiny-sdxl").details("parallel")[0]
    if count >= 2:
        assert auto.optimization_report("tiny-sdxl").status("parallel") == "applied" and "cuda:1" in detail
    else:
        assert "one GPU" in detail
    base = plain.generate(**kw).images
    same(base, auto.generate(**kw).images, "auto")
    same(base, forced.generate(**kw).images, "forced cuda:0 twice")
    assert handle_of(forced, "tiny-sdxl").stats.split_calls > 0
    if count >= 2:
        o2 = Engine(device="cuda:0", opt_level="O2", compile_config={"dtype": "fp32"})
        report = o2.optimization_report("tiny-sdxl")
        if report.status("cuda_graphs") == "applied":  # whole-model compile: the hooks would be traced
            assert report.status("parallel") == "skipped" and "cuda_graphs" in report.details("parallel")[0]
        else:
            assert report.status("parallel") == "applied"
