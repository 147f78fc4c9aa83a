"""ONNX / TensorRT backends: exported components match torch, whole generations match the torch backend, artifacts
are reused across processes, bad artifacts are rebuilt, builds are not duplicated, TensorRT is skipped with its
reason where it cannot run, and the TensorRT build's pure parts (profiles, precision plans, cache keys)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import images_close

from engine import Engine
from engine.compiler import CompileConfig, optimize
from engine.compiler.export import ort, store, tensorrt
from engine.compiler.export.modules import ExportedModule
from engine.compiler.export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, Dim, ExportSpec, TensorSpec, export_onnx
from engine.compiler.export.specs import SizeProfile, vae_decoder_spec
from engine.loading import load_model

pytest.importorskip("onnxruntime")  # the extra `engine[onnx]`; the engine imports it only when a backend asks
pytest.importorskip("onnx")

CPU = torch.device("cpu")
ORT = {"backend": "onnxruntime"}
KW = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=64, num_inference_steps=2,
          guidance_scale=5.0, seed=3)
ARTIFACT = re.compile(r"(onnx-[\w-]+|trt-\w+) (reused from cache|exported in [\d.]+ s|built)")


def backend_details(report) -> list[str]:
    return report.details("backend")


def artifact_of(report, component: str) -> tuple[str, str]:
    """(artifact key, how it was obtained) of one component, from its report line."""
    line = next(d for d in backend_details(report) if d.startswith(f"{component}: onnxruntime"))
    key, how = ARTIFACT.search(line).groups()
    return key, how


@pytest.fixture(scope="module")
def reference():
    eng = Engine(device="cpu")
    return {m: eng.generate(model=m, **KW).images for m in ("tiny-sdxl", "tiny-flux")}


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-flux"])
def exported(request):
    """(originals, replaced components, report) after the backend pass on a freshly loaded tiny model."""
    loaded = load_model(request.param)
    originals = dict(loaded.components)
    report, _ = optimize(loaded.components, loaded.family, CPU, CompileConfig(backend="onnxruntime"))
    return loaded.family, originals, loaded.components, report


# -- exported components --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pick", ["min", "opt", "trace"])
def test_exported_components_match_torch(exported, pick):
    """Denoiser (SDXL UNet / FLUX transformer) and VAE decoder on the CPU provider vs torch, fp32, within 1e-4, at
    the profile's min and opt shapes (batch, resolution and prompt length other than the traced ones)."""
    family, originals, replaced, report = exported
    for name in (family.denoiser, "vae"):
        wrapper = replaced[name]
        assert isinstance(wrapper, ExportedModule), backend_details(report)
        assert "CPUExecutionProvider" in wrapper.runner.description
        inputs = wrapper.spec.example_inputs(torch.float32, CPU, pick=pick, seed=7)
        with torch.inference_mode():
            got = wrapper.spec.call(wrapper, inputs)  # the wrapper through the original's call signature
            want = wrapper.spec.call(originals[name], inputs)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4, (name, pick)


def test_stand_ins_look_like_the_originals(exported):
    family, originals, replaced, _ = exported
    for name in (family.denoiser, "vae"):
        wrapper, original = replaced[name], originals[name]
        assert wrapper.config is original.config
        assert next(wrapper.parameters()).dtype == torch.float32 and wrapper.device == CPU
    if family.name == "sdxl":
        unet = replaced["unet"]
        assert unet.add_embedding.linear_1.in_features == originals["unet"].add_embedding.linear_1.in_features
        x = unet.spec.example_inputs(torch.float32, CPU, pick="min")
        with pytest.raises(NotImplementedError, match="mid_block_additional_residual"):
            unet(x["sample"], 1.0, x["encoder_hidden_states"], mid_block_additional_residual=x["sample"],
                 added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
        with pytest.raises(ValueError, match="outside the exported profile"):
            replaced["vae"].decode(torch.zeros(1, 4, 4, 4), return_dict=False)
        with pytest.raises(RuntimeError, match="load the model again"):
            unet.to(torch.float16)


def test_large_models_use_one_external_data_file(tmp_path):
    """The >2 GB path, forced with a zero threshold on the tiny VAE: one data file beside the graph; checked and run."""
    import onnxruntime

    loaded = load_model("tiny-sdxl")
    vae = loaded.components["vae"]
    spec = vae_decoder_spec(vae, SizeProfile.for_family(loaded.family, vae))
    meta = export_onnx(vae, spec, tmp_path, dtype=torch.float32, device=CPU, external_data_threshold=0)
    assert meta["external_data"] and sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, EXTERNAL_DATA_FILE]
    assert (tmp_path / EXTERNAL_DATA_FILE).stat().st_size > (tmp_path / MODEL_FILE).stat().st_size
    session = onnxruntime.InferenceSession(str(tmp_path / MODEL_FILE), providers=["CPUExecutionProvider"])
    z = spec.example_inputs(torch.float32, CPU, pick="min")["latents"]
    with torch.inference_mode():
        want = vae.decode(z, return_dict=False)[0]
    got = torch.from_numpy(session.run(None, {"latents": z.numpy()})[0])
    assert (got - want).abs().max().item() < 1e-4


# -- whole generations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_generate_on_onnxruntime_matches_torch(reference, model):
    eng = Engine(device="cpu", compile_config=ORT)
    images = eng.generate(model=model, **KW).images
    ok, fraction = images_close(images, reference[model])
    assert ok, f"{model}: only {fraction:.4%} of values within 1 level"
    report = eng.optimization_report(model)
    assert report.status("backend") == "applied"
    assert {d.split(":")[0] for d in backend_details(report)} == {report_denoiser(model), "vae"}


def report_denoiser(model: str) -> str:
    return "unet" if "sd" in model else "transformer"


def test_torch_backend_is_reported():
    report = Engine(device="cpu").optimization_report("tiny-sdxl")
    assert report.status("backend") == "skipped" and "torch requested" in backend_details(report)[0]


def test_tensorrt_is_skipped_here_and_onnxruntime_runs(reference):
    eng = Engine(device="cpu", compile_config={"backend": "tensorrt"})
    report = eng.optimization_report("tiny-sdxl")
    details = backend_details(report)
    assert any(d.startswith("tensorrt: no CUDA device (device is cpu); falling back to onnxruntime") for d in details)
    assert [d.split(" ")[:2] for d in details if d.startswith(("unet", "vae"))] == [
        ["unet:", "onnxruntime"], ["vae:", "onnxruntime"]]
    ok, _ = images_close(eng.generate(model="tiny-sdxl", **KW).images, reference["tiny-sdxl"])
    assert ok


def test_missing_onnxruntime_is_reported_and_torch_runs(monkeypatch, reference):
    monkeypatch.setattr(ort, "installed", lambda: False)
    eng = Engine(device="cpu", compile_config={"backend": "tensorrt"})
    assert backend_details(eng.optimization_report("tiny-sdxl")) == [
        "tensorrt: no CUDA device (device is cpu); staying on torch",
        "onnxruntime: package not installed (pip install 'engine[onnx]'); staying on torch",
        "no exported backend can run here: the denoiser and VAE decoder stay on torch"]
    assert images_close(eng.generate(model="tiny-sdxl", **KW).images, reference["tiny-sdxl"], levels=0)[0]


def test_quantized_denoiser_stays_on_torch_with_reason():
    eng = Engine(device="cpu", compile_config={**ORT, "quant": "int8_weight_only"})
    details = backend_details(eng.optimization_report("tiny-sdxl"))
    assert any(d.startswith("unet: weights are torchao-quantized") and "stays on torch" in d for d in details)
    assert any(d.startswith("vae: onnxruntime") for d in details)
    assert eng.generate(model="tiny-sdxl", **KW).images


def test_compile_leaves_exported_components_alone():
    eng = Engine(device="cpu", compile_config={**ORT, "compile": True, "compile_vae": True, "cuda_graphs": "auto"})
    report = eng.optimization_report("tiny-sdxl")
    assert report.status("backend") == "applied" and report.status("compile") == "skipped"
    assert report.details("compile") == ["unet: runs on onnxruntime (exported graph), not compiled",
                                         "vae decoder: runs on onnxruntime (exported graph), not compiled"]


def test_loras_on_an_exported_denoiser_are_refused_clearly(tmp_path):
    from engine import errors

    eng = Engine(device="cpu", compile_config=ORT)
    eng.load("tiny-sdxl")
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"not read: refused before any file is opened")
    with pytest.raises(errors.InvalidRequestError, match="exported onnxruntime graph") as info:
        eng.generate(model="tiny-sdxl", **KW, loras=[{"path": str(lora)}])
    assert info.value.field == "loras"
    assert eng.generate(model="tiny-sdxl", **KW).images  # the engine stays usable


def test_cli_backend_flag(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red cube", "--width", "64", "--height", "64",
                 "--steps", "1", "--seed", "1", "--backend", "onnxruntime", "--verbose", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"backend +applied +unet: onnxruntime CPUExecutionProvider", printed), printed
    assert out.is_file()


# -- the artifact store --------------------------------------------------------------------------------------


NEW_PROCESS = textwrap.dedent("""
    import json
    from engine import Engine
    from engine.compiler.export import stats
    eng = Engine(device="cpu", compile_config={"backend": "onnxruntime"})
    eng.generate(model="tiny-sdxl", prompt="a lighthouse", width=64, height=64, num_inference_steps=1, seed=0)
    print("STATS" + json.dumps(stats()))
""")


def test_a_new_process_reuses_the_exported_artifacts():
    Engine(device="cpu", compile_config=ORT).load("tiny-sdxl")  # make sure both artifacts exist on disk
    out = subprocess.run([sys.executable, "-c", NEW_PROCESS], env=dict(os.environ), capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    counters = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("STATS"))[5:])
    assert counters == {"hits": 2, "builds": 0, "rebuilds": 0}


def test_a_truncated_artifact_is_rebuilt(reference):
    report = Engine(device="cpu", compile_config=ORT).optimization_report("tiny-sdxl")
    key, _ = artifact_of(report, "vae")
    graph = store.store_root() / key / MODEL_FILE
    size = graph.stat().st_size
    with open(graph, "r+b") as f:
        f.truncate(size // 2)
    before = store.stats()
    eng = Engine(device="cpu", compile_config=ORT)
    again = eng.optimization_report("tiny-sdxl")
    assert store.stats()["rebuilds"] == before["rebuilds"] + 1
    assert artifact_of(again, "vae")[0] == key and artifact_of(again, "vae")[1].startswith("exported")
    assert graph.stat().st_size == size
    assert images_close(eng.generate(model="tiny-sdxl", **KW).images, reference["tiny-sdxl"])[0]


def _write(folder, data: bytes = b"graph") -> dict:
    (folder / "model.onnx").write_bytes(data)
    return {"note": "test"}


def test_store_verifies_contents_not_just_presence():
    key = f"test-verify-{os.getpid()}-{time.monotonic_ns()}"
    first = store.get_or_build(key, _write)
    assert not first.reused and first.meta == {"note": "test"}
    assert store.get_or_build(key, _write).reused
    (first.path / "model.onnx").write_bytes(b"grapX")  # same size, other bytes
    before = store.stats()["rebuilds"]
    assert not store.get_or_build(key, _write).reused and store.stats()["rebuilds"] == before + 1
    (first.path / store.MANIFEST).unlink()  # an interrupted copy: files without a manifest
    assert not store.get_or_build(key, _write).reused


def test_store_build_failure_leaves_nothing():
    key = f"test-fail-{os.getpid()}-{time.monotonic_ns()}"

    def fail(folder):
        (folder / "model.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        store.get_or_build(key, fail)
    assert not (store.store_root() / key).exists()
    assert not [p for p in store.store_root().iterdir() if p.name.startswith(f".{key}")]


def test_a_build_in_progress_is_waited_for_not_duplicated():
    """A second caller (here a thread with its own lock handle, as another process would have) blocks on the file
    lock while the first builds, then reuses the result without building."""
    key = f"test-lock-{os.getpid()}-{time.monotonic_ns()}"
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(folder):
        calls.append("slow")
        started.set()
        assert release.wait(30)
        return _write(folder)

    def fast(folder):
        calls.append("fast")
        return _write(folder)

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", store.get_or_build(key, slow)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.setdefault("second", store.get_or_build(key, fast)))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second caller should be waiting for the lock"
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["slow"] and results["second"].reused and not results["first"].reused


# -- TensorRT and provider selection: pure parts -----------------------------------------------------------------


def _spec() -> ExportSpec:
    batch, h, w = Dim("batch", 1, 2, 16, 2), Dim("h", 8, 128, 512, 9), Dim("w", 8, 128, 512, 11)
    text = Dim("text_len", 1, 77, 77, 77)
    return ExportSpec(component="unet", inputs=(TensorSpec("sample", (batch, 4, h, w)),
                                                TensorSpec("timestep", (batch,), "fp32"),
                                                TensorSpec("encoder_hidden_states", (batch, text, 2048))),
                      output="noise_pred", output_axes={0: "batch"}, output_shape=lambda x: (1,), call=lambda m, x: x)


def test_tensorrt_profile_shapes():
    shapes = tensorrt.profile_shapes(_spec())
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 128, 128), (16, 4, 512, 512))
    assert shapes["timestep"] == ((1,), (2,), (16,))
    assert shapes["encoder_hidden_states"] == ((1, 1, 2048), (2, 77, 2048), (16, 77, 2048))


def test_family_profiles_cover_what_requests_can_ask():
    loaded = load_model("tiny-sdxl")
    profile = SizeProfile.for_family(loaded.family, loaded.components["vae"])
    assert (profile.min_px, profile.opt_px, profile.max_px, profile.images) == (64, 128, 4096, 8)
    spec = vae_decoder_spec(loaded.components["vae"], profile)
    assert tensorrt.profile_shapes(spec)["latents"] == ((1, 4, 8, 8), (1, 4, 16, 16), (8, 4, 512, 512))
    with pytest.raises(ValueError):
        Dim("bad", 4, 2, 8, 4)


def test_tensorrt_precision_plans():
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        plan = tensorrt.precision_plan(name)
        assert plan.export_dtype == dtype and plan.network_flags == ("STRONGLY_TYPED",) and not plan.builder_flags
        assert not plan.note
    fp8 = tensorrt.precision_plan("fp8", half="bf16")
    assert fp8.export_dtype == torch.bfloat16 and "Q/DQ" in fp8.note
    with pytest.raises(ValueError, match="int4"):
        tensorrt.precision_plan("int4")
    assert tensorrt.precision_for(torch.bfloat16, "none") == "bf16"
    assert tensorrt.precision_for(torch.float16, "fp8") == "fp8"
    assert tensorrt.precision_for(torch.float32, "int8_weight_only") == "fp32"
    # bf16 graphs with convolutions do not pass ONNX's checker at our opset: fp16, or fp32 where fp16 overflows
    assert tensorrt.graph_precision("bf16", convolutions=False, fp16_ok=True) == ("bf16", "")
    assert tensorrt.graph_precision("bf16", convolutions=True, fp16_ok=True)[0] == "fp16"
    assert tensorrt.graph_precision("bf16", convolutions=True, fp16_ok=False)[0] == "fp32"
    assert tensorrt.graph_precision("fp16", convolutions=True, fp16_ok=False) == ("fp16", "")


def test_tensorrt_engine_keys():
    spec = _spec()
    base = dict(onnx_key="onnx-unet-abc", spec=spec, precision="fp16", trt_version="10.13.0", device_tag="cuda-H100")
    key = tensorrt.engine_key(**base)
    assert key == tensorrt.engine_key(**base) and key.startswith("trt-")
    wider = ExportSpec(**{**spec.__dict__, "inputs": (TensorSpec("sample", (Dim("batch", 1, 2, 32, 2), 4, 8, 8)),)})
    for change in ({"precision": "bf16"}, {"trt_version": "10.14.0"}, {"device_tag": "cuda-L4"},
                   {"onnx_key": "onnx-unet-abd"}, {"spec": wider}):
        assert tensorrt.engine_key(**{**base, **change}) != key, change
    name = tensorrt.timing_cache_name("10.13.0", "cuda-NVIDIA H100/sm90")
    assert name == "timing-10.13.0-cuda-NVIDIA_H100_sm90.cache"


def test_tensorrt_availability_reasons():
    assert tensorrt.unavailable_reason(CPU) == "no CUDA device (device is cpu)"


def test_onnxruntime_needs_a_gpu_provider_on_cuda():
    cuda = torch.device("cuda", 0)
    assert ort.unavailable_reason(CPU) is None
    assert ort.unavailable_reason(cuda, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    why = ort.unavailable_reason(cuda, ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert "no GPU provider" in why and "onnxruntime-gpu" in why


def test_onnxruntime_provider_choice():
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = torch.device("cuda", 0)
    assert ort.provider_order(cuda, everything) == everything
    assert ort.provider_order(cuda, ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert ort.provider_order(CPU, everything) == ["CPUExecutionProvider"]
    assert ort.graph_dtype("CPUExecutionProvider", torch.bfloat16) == (torch.float32,
                                                                       "bf16 -> fp32 (CPU provider kernels)")
    assert ort.graph_dtype("CUDAExecutionProvider", torch.float16) == (torch.float16, "")
    options = ort.provider_options("TensorrtExecutionProvider", cuda, _spec(), torch.float16, store.store_root())
    assert options["trt_fp16_enable"] and options["trt_profile_min_shapes"].startswith("sample:1x4x8x8,timestep:1,")
    assert options["trt_profile_max_shapes"].endswith("encoder_hidden_states:16x77x2048")


# -- narrow profiles, precision per provider, host placement: pure parts ---------------------------------------


def _sdxl_like():
    """The tiny SDXL's UNet and VAE (its VAE scales by 8, as SDXL's does) under SDXL's family range, native 1024."""
    from engine.compiler.export.specs import denoiser_spec

    loaded = load_model("tiny-sdxl")
    profile = SizeProfile(64, 1024, 4096, 8, True)
    unet_for = lambda p: denoiser_spec("unet", loaded.components["unet"], loaded.components, p)  # noqa: E731
    return loaded, profile, unet_for


def test_tensorrt_static_buckets_for_simulated_requests():
    from engine.compiler.export.profiles import POLICIES, BucketPlan, narrow

    _, profile, unet_for = _sdxl_like()
    wide = unet_for(profile)
    plan = BucketPlan.create(POLICIES["tensorrt"], wide, rows_per_image=2)
    first = plan.initial()  # native size, up to 4 images with guidance
    assert first.bounds == {"batch": (1, 2, 8), "latent_height": (128, 128, 128), "latent_width": (128, 128, 128),
                            "text_len": (1, 77, 77)}  # the prompt axis keeps the graph's range
    assert first.static
    assert tensorrt.profile_shapes(narrow(wide, first))["sample"] == ((1, 4, 128, 128), (2, 4, 128, 128),
                                                                      (8, 4, 128, 128))
    portrait = plan.bucket_for({"batch": 2, "latent_height": 1344 // 8, "latent_width": 768 // 8, "text_len": 77})
    assert portrait.bounds["latent_height"] == (168, 168, 168) and portrait.bounds["latent_width"] == (96, 96, 96)
    assert plan.bucket_for({"batch": 16, "latent_height": 128, "latent_width": 128}).bounds["batch"] == (1, 16, 16)
    assert plan.bucket_for({"batch": 18, "latent_height": 128, "latent_width": 128}) is None  # past the ladder
    assert plan.bucket_for({"batch": 2, "latent_height": 600, "latent_width": 128}) is None  # past the family
    assert plan.outside_axis({"batch": 2, "latent_height": 600, "latent_width": 128}) == "latent_height"
    keys = {tensorrt.engine_key(onnx_key="onnx-unet-x", spec=narrow(wide, b), precision="bf16", trt_version="10",
                                device_tag="cuda-H100") for b in (first, portrait)}
    assert len(keys) == 2  # one engine per bucket, each keyed by its own profile


def test_flux_static_buckets_pin_the_image_tokens_not_the_prompt_length():
    from engine.compiler.export.profiles import POLICIES, BucketPlan
    from engine.compiler.export.specs import denoiser_spec

    loaded = load_model("tiny-flux")
    wide = denoiser_spec("transformer", loaded.components["transformer"], loaded.components,
                         SizeProfile(64, 1024, 4096, 8, False))
    plan = BucketPlan.create(POLICIES["tensorrt"], wide, rows_per_image=1)
    first = plan.initial()
    assert first.bounds["image_tokens"] == (64 * 64,) * 3 and first.bounds["batch"] == (1, 1, 4)
    assert first.bounds["text_len"] == (1, 512, 512)
    assert first.contains({"batch": 1, "image_tokens": 4096, "text_len": 256})  # schnell's default prompt length
    assert not first.contains({"batch": 1, "image_tokens": 48 * 64, "text_len": 256})


def test_dynamic_buckets_are_narrow_pixel_ranges():
    from engine.compiler.export.profiles import POLICIES, BucketPlan

    _, profile, unet_for = _sdxl_like()
    plan = BucketPlan.create(POLICIES["onnxruntime-tensorrt"], unet_for(profile), 2, profile, unet_for)
    first = plan.initial()
    assert first.bounds["latent_height"] == (64, 128, 192) and first.bounds["batch"][2] == 8  # 512-1536 px, 4 images
    big = plan.bucket_for({"batch": 2, "latent_height": 2048 // 8, "latent_width": 2048 // 8, "text_len": 77})
    assert big.bounds["latent_width"] == (192, 192, 256)  # 1536-2048 px, optimum nearest the native size
    small = plan.bucket_for({"batch": 1, "latent_height": 32, "latent_width": 48, "text_len": 77})
    assert small.bounds["latent_height"][0] == 8 and small.bounds["latent_height"][2] == 64  # 64-512 px
    with pytest.raises(ValueError, match="spec builder"):
        BucketPlan.create(POLICIES["onnxruntime-tensorrt"], unet_for(profile), 2)


class _FakeEngine:
    def __init__(self, bucket):
        self.bucket, self.description, self.calls = bucket, "fake", 0

    def __call__(self, inputs, output):
        self.calls += 1
        output.fill_(1.0)


def _bucketed(policy):
    from engine.compiler.export.profiles import BucketedRunner, BucketPlan

    _, profile, unet_for = _sdxl_like()
    wide = unet_for(profile)
    built, released = [], []

    def build(bucket):
        built.append(bucket)
        return _FakeEngine(bucket)

    runner = BucketedRunner(BucketPlan.create(policy, wide, 2), wide, build, release=lambda: released.append(1))
    return runner, wide, built, released


def _inputs(spec, batch, h, w):
    x = spec.example_inputs(torch.float32, CPU, pick="opt")
    x["sample"] = torch.zeros(batch, 4, h, w)
    for name in ("timestep", "encoder_hidden_states", "text_embeds", "time_ids"):
        x[name] = x[name][:1].expand(batch, *x[name].shape[1:])
    return x


def test_bucketed_runner_builds_new_sizes_and_keeps_a_bounded_set():
    from engine.compiler.export.profiles import POLICIES

    runner, wide, built, released = _bucketed(POLICIES["tensorrt"])
    runner.prepare(runner.plan.initial())
    out = torch.zeros(1)
    runner(_inputs(wide, 2, 128, 128), out)  # the native size: the engine built at load
    runner(_inputs(wide, 1, 128, 128), out)  # fewer rows fit the same engine
    assert len(built) == 1 and out.item() == 1.0
    for h, w in ((96, 128), (128, 96), (64, 64)):  # three new sizes: built on demand, the oldest dropped
        runner(_inputs(wide, 2, h, w), out)
    assert len(built) == 4 and len(runner.engines) == 3 and released == [1]
    assert [b.bounds["latent_height"][0] for b in runner.engines] == [96, 128, 64]
    runner(_inputs(wide, 2, 96, 128), out)  # still held: reused, not rebuilt
    assert len(built) == 4


def test_outside_profile_is_a_typed_request_error_when_the_policy_does_not_build():
    import dataclasses

    from engine import errors
    from engine.compiler.export import profiles
    from engine.compiler.export.profiles import POLICIES
    from engine.errors import OutsideProfileError

    assert profiles.OutsideProfileError is OutsideProfileError  # callers importing it from profiles still work
    assert (OutsideProfileError.error_type, OutsideProfileError.http_status) == ("invalid_request", 422)
    runner, wide, built, _ = _bucketed(dataclasses.replace(POLICIES["tensorrt"], on_miss="error"))
    runner.prepare(runner.plan.initial())
    with pytest.raises(OutsideProfileError, match="latent_height=96") as info:
        runner(_inputs(wide, 2, 96, 128), torch.zeros(1))
    assert isinstance(info.value, errors.InvalidRequestError) and info.value.field == "height"
    assert info.value.to_dict()["detail"][0]["loc"] == ["body", "height"]
    runner, wide, _, _ = _bucketed(POLICIES["tensorrt"])  # building policy: past the image ladder is refused too
    with pytest.raises(OutsideProfileError) as info:
        runner(_inputs(wide, 18, 128, 128), torch.zeros(1))
    assert info.value.field == "num_images"


def test_a_failed_execution_context_drops_an_engine_and_retries_once():
    from engine.compiler.export.profiles import POLICIES, BucketedRunner, BucketPlan, NoExecutionContext

    _, profile, unet_for = _sdxl_like()
    wide = unet_for(profile)
    attempts = []

    def build(bucket):
        attempts.append(bucket)
        if len(attempts) == 2:
            raise NoExecutionContext("out of memory")
        return _FakeEngine(bucket)

    runner = BucketedRunner(BucketPlan.create(POLICIES["tensorrt"], wide, 2), wide, build)
    runner.prepare(runner.plan.initial())
    runner(_inputs(wide, 2, 96, 96), torch.zeros(1))
    assert len(attempts) == 3 and len(runner.engines) == 1  # the first engine made room for the new one


def test_tensorrt_context_failure_falls_back_with_its_reason(monkeypatch):
    """The TensorRT path up to the runner, faked where it needs a GPU: the engine of the native bucket is built at
    load; an execution context that cannot be created (None) falls back to onnxruntime with the reason reported."""
    from engine.compiler import backend
    from engine.compiler.export.profiles import NoExecutionContext

    builds = []

    def fake_build(onnx_path, spec, plan, out, timing, device):
        builds.append(tensorrt.profile_shapes(spec))
        (out / tensorrt.ENGINE_FILE).write_bytes(b"engine")
        return {"precision": plan.precision}

    class NoContext:
        def __init__(self, path, device):
            raise NoExecutionContext(tensorrt.context_failure(path.parent.name, 3 * 2**30, 2**30))

    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(tensorrt, "version", lambda: f"fake-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt, "TrtRunner", NoContext)
    loaded = load_model("tiny-sdxl")
    report, state = optimize(loaded.components, loaded.family, CPU, CompileConfig(backend="tensorrt"))
    details = backend_details(report)
    failed = [d for d in details if "tensorrt failed" in d]
    assert failed and all("NoExecutionContext" in d and "3072 MiB" in d and "1024 MiB are free" in d for d in failed)
    assert state["backend"] == {"unet": "onnxruntime", "vae": "onnxruntime"}
    # each component built exactly one engine, for its native bucket: static 128 px (16 latents), up to 4 images
    assert builds[0]["sample"] == ((1, 4, 16, 16), (2, 4, 16, 16), (8, 4, 16, 16))
    assert builds[1]["latents"] == ((1, 4, 16, 16), (1, 4, 16, 16), (4, 4, 16, 16))
    assert backend.host_device(CPU) is None and backend.host_device(torch.device("cuda", 0)) == CPU


def test_tensorrt_report_names_the_bucket_and_later_sizes_build(monkeypatch):
    built = []

    def fake_build(onnx_path, spec, plan, out, timing, device):
        built.append(spec.component)
        (out / tensorrt.ENGINE_FILE).write_bytes(b"engine")
        return {}

    class Zeros:
        description = "tensorrt fake"

        def __init__(self, path, device):
            pass

        def __call__(self, inputs, output):
            output.zero_()

    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(tensorrt, "version", lambda: f"fake-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt, "TrtRunner", Zeros)
    eng = Engine(device="cpu", compile_config={"backend": "tensorrt"})
    details = backend_details(eng.optimization_report("tiny-sdxl"))
    line = next(d for d in details if d.startswith("unet: "))
    assert "tensorrt fake fp32" in line and "static profile batch=1..8, latent_height=16, latent_width=16" in line
    assert "other sizes build an engine on first use, at most 3 kept" in line
    assert built == ["unet", "vae_decoder"]
    eng.generate(model="tiny-sdxl", **KW)  # 64 px: a new bucket for each component
    assert built == ["unet", "vae_decoder"] * 2
    eng.generate(model="tiny-sdxl", **KW)
    assert len(built) == 4


def test_tensorrt_precision_per_component_of_a_bf16_model(monkeypatch):
    """bf16 model, TensorRT faked where it needs a GPU: the UNet (convolutions) builds fp16, the VAE (force_upcast)
    fp32, FLUX's transformer (no convolution) bf16; the engines are built from graphs exported in those dtypes."""
    exported = []

    def fake_build(onnx_path, spec, plan, out, timing, device):
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        exported.append((spec.component, plan.precision, graph.input[0].type.tensor_type.elem_type))
        (out / tensorrt.ENGINE_FILE).write_bytes(b"engine")
        return {}

    class Zeros:
        description = "tensorrt fake"

        def __init__(self, path, device):
            pass

    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(tensorrt, "version", lambda: f"fake-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt, "TrtRunner", Zeros)
    import onnx

    for model in ("tiny-sdxl", "tiny-flux"):
        loaded = load_model(model)
        report, _ = optimize(loaded.components, loaded.family, CPU, CompileConfig(backend="tensorrt", dtype="bf16"))
        assert report.status("backend") == "applied", backend_details(report)
    fp16, fp32, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16
    force_upcast = load_model("tiny-sdxl").components["vae"].config.force_upcast
    vae = ("fp32", fp32) if force_upcast else ("fp16", fp16)
    assert exported == [("unet", "fp16", fp16), ("vae_decoder", *vae), ("transformer", "bf16", bf16),
                        ("vae_decoder", *vae)]


def test_onnxruntime_precision_per_provider_and_dtype():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    plans = {(p, str(d)): ort.graph_dtype(p, d)[0] for p in (cuda, "TensorrtExecutionProvider", cpu)
             for d in (torch.float32, torch.float16, torch.bfloat16)}
    assert plans[(cuda, "torch.bfloat16")] == torch.float16 and plans[(cuda, "torch.float16")] == torch.float16
    assert plans[("TensorrtExecutionProvider", "torch.bfloat16")] == torch.float16
    assert plans[(cuda, "torch.float32")] == torch.float32
    assert {v for (p, _), v in plans.items() if p == cpu} == {torch.float32}
    assert ort.graph_dtype(cuda, torch.bfloat16)[1].startswith("bf16 -> fp16")
    upcast = SimpleConfig(force_upcast=True)
    assert not ort.fp16_safe("vae", upcast) and ort.fp16_safe("unet", upcast) and ort.fp16_safe("vae", SimpleConfig())
    assert ort.graph_dtype(cuda, torch.bfloat16, fp16_ok=False) == (torch.float32,
                                                                    "bf16 -> fp32 (overflows in fp16: force_upcast)")


class SimpleConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_onnx_artifacts_are_keyed_by_graph_precision():
    from engine.compiler import backend
    from engine.compiler.context import PassContext
    from engine.compiler.report import OptimizationReport

    loaded = load_model("tiny-sdxl")
    ctx = PassContext(loaded.components, loaded.family, CPU, CompileConfig(), OptimizationReport("", "cpu"))
    unet = next(t for t in backend._targets(ctx) if t.name == "unet")
    keys = {d: backend.onnx_key(ctx, unet, d) for d in (torch.float32, torch.float16, torch.bfloat16)}
    assert len(set(keys.values())) == 3
