"""GGUF single files: a FLUX transformer quantized to Q8_0 (as city96's files are) loads through diffusers' GGUF
support, keeps its weights quantized, and generates close to the fp32 model; bad files fail with a clear error."""

import re

import numpy as np
import pytest
import torch

from engine import Engine, errors
from engine.loading.original_layout import original_state_dict
from engine.loading.pretrained import load_folder
from engine.loading.tiny import ensure_tiny_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

ARGS = dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=3, guidance_scale=3.5, seed=3,
            max_sequence_length=64)
NORM_SCALE = re.compile(r"(_norm\.scale|\.norm_(added_)?[qk]\.weight)$")  # QK norms, BFL and diffusers keys
PSNR_FLOOR_DB = 45.0  # measured 58.1-59.7 dB over seeds 0-4 (Q8_0 vs fp32, this tiny model, these arguments)


def write_gguf(sd: dict[str, torch.Tensor], path, *, quant=Q.Q8_0, arch: str = "flux"):
    """As city96's converter does: 2-D weights quantized where the row length allows, other 2-D weights F16,
    1-D tensors F32 (norm scales BF16 here, to cover a quantized type that is not a Linear weight)."""
    block = gguf.GGML_QUANT_SIZES[quant][0]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, tensor in sd.items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, quant), raw_dtype=quant)
        elif NORM_SCALE.search(key):
            writer.add_tensor(key, gguf.quants.quantize(array, Q.BF16), raw_dtype=Q.BF16)
        else:
            writer.add_tensor(key, array.astype(np.float32 if array.ndim == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def psnr(a, b) -> float:
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def transformer():
    return load_folder(ensure_tiny_model("flux"), only={"transformer"})["transformer"]


@pytest.fixture(scope="module")
def bfl_file(transformer, tmp_path_factory):
    sd = original_state_dict({"transformer": transformer}, "flux")  # BFL keys, as city96's FLUX files
    return write_gguf(sd, tmp_path_factory.mktemp("gguf") / "tiny-flux-Q8_0.gguf")


@pytest.fixture(scope="module")
def gguf_engine(bfl_file):
    eng = Engine(device="cpu")
    eng.load(str(bfl_file), config="tiny-flux")
    return eng


def test_q8_0_file_generates_close_to_fp32(gguf_engine, bfl_file, engine):
    got = gguf_engine.generate(model=str(bfl_file), **ARGS)
    reference = engine.generate(model="tiny-flux", **ARGS)
    assert psnr(got.images, reference.images) > PSNR_FLOOR_DB


def test_transformer_weights_stay_quantized(gguf_engine, bfl_file, transformer):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    loaded = gguf_engine.load(str(bfl_file))
    model = loaded.components["transformer"]
    assert loaded.family.name == "flux" and model.config.guidance_embeds
    linears = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    quantizable = {n for n, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0}
    assert set(linears) == quantizable and len(linears) > 20
    for module in linears.values():
        weight = module.weight
        assert isinstance(weight, GGUFParameter) and weight.quant_type == Q.Q8_0 and weight.dtype == torch.uint8
        assert tuple(weight.quant_shape) == (module.out_features, module.in_features)
        assert weight.numel() == module.out_features * module.in_features // 32 * 34  # Q8_0: 34 bytes per 32
        assert module.compute_dtype == torch.float32
    rest = [p for p in model.parameters() if not isinstance(p, GGUFParameter)]
    assert rest and all(p.dtype == torch.float32 for p in rest)  # biases, BF16 norm scales, F16 x_embedder
    assert isinstance(model.x_embedder, torch.nn.Linear) and not isinstance(model.x_embedder, GGUFLinear)
    # the other components come from the config folder
    assert {"vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"} <= set(loaded.components)


def test_pipeline_computes_in_the_compute_dtype(gguf_engine, bfl_file):
    """The first parameter of a GGUF transformer is quantized storage (uint8); the pipeline's inputs must take the
    compute dtype, not that."""
    from engine.pipelines.base import module_dtype

    assert module_dtype(gguf_engine.load(str(bfl_file)).components["transformer"]) == torch.float32


def test_diffusers_layout_file_without_config(transformer, tmp_path, gguf_engine, bfl_file):
    """Diffusers keys (transformer_blocks.*): same quantized rows as the BFL file (Q8_0 blocks run along rows, so
    the fused qkv splits exactly), so the same image; with no config the tiny FLUX config is found by shape."""
    path = write_gguf(transformer.state_dict(), tmp_path / "diffusers-layout.gguf")
    eng = Engine(device="cpu")
    loaded = eng.load(str(path))
    assert loaded.family.name == "flux"
    got = eng.generate(model=str(path), **ARGS)
    assert psnr(got.images, gguf_engine.generate(model=str(bfl_file), **ARGS).images) == float("inf")


def test_cli_generate(bfl_file, tmp_path):
    from engine.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", "--model", str(bfl_file), "--config", str(ensure_tiny_model("flux")), "--prompt", "a fox",
                 "--width", "64", "--height", "64", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file()


def test_truncated_file(bfl_file, tmp_path):
    data = bfl_file.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.ModelLoadError, match="not a readable GGUF file"):
        Engine(device="cpu").load(str(bad), config="tiny-flux")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "renamed.gguf"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(errors.ModelLoadError, match="not a GGUF file"):
        Engine(device="cpu").load(str(bad))


def test_non_flux_file_is_refused(tmp_path):
    """An SDXL UNet GGUF (LDM keys): only FLUX transformers are supported, and the message says what the file is."""
    sd = {"input_blocks.0.0.weight": torch.randn(32, 4 * 9), "input_blocks.0.0.bias": torch.randn(32),
          "label_emb.0.0.weight": torch.randn(32, 64)}
    path = write_gguf(sd, tmp_path / "sdxl-unet-Q8_0.gguf", arch="sdxl")
    with pytest.raises(errors.ModelLoadError, match=r"'sdxl' model .*only FLUX\.1 transformer GGUF files"):
        Engine(device="cpu").load(str(path))


def test_config_of_another_architecture(bfl_file):
    """The shipped FLUX.1-schnell config has other shapes (and no guidance embedder): a clear error, nothing loaded."""
    with pytest.raises(errors.ModelLoadError, match="no flux architecture config matches"):
        Engine(device="cpu").load(str(bfl_file), config="flux-schnell")


def test_default_passes_skip_fusing_quantized_projections(bfl_file):
    eng = Engine(device="cpu", opt_level="O1")
    eng.load(str(bfl_file), config="tiny-flux")
    report = eng.optimization_report(str(bfl_file))
    assert "transformer: q/k/v weights are stored quantized" in report.details("fuse_qkv")[0]
    assert eng.generate(model=str(bfl_file), **ARGS).images


def test_memory_plan_sizes_gguf_weights_as_stored_and_never_requantizes(bfl_file):
    """GGUF blocks are uint8 storage: counted at their stored bytes, kept as loaded under lossy storage plans, and
    the O3 quant pass leaves them alone."""
    from engine.runtime.memory import is_prequantized, sizes_from_components

    eng = Engine(device="cpu", memory_plan="int8+resident", allow_lossy_memory=True,
                 compile_config={"quant": "int8_weight_only"})
    eng.load(str(bfl_file), config="tiny-flux")
    transformer = eng._slots[str(bfl_file)].loaded.components["transformer"]
    assert is_prequantized(transformer)
    stored = sum(p.numel() * p.element_size() for p in transformer.parameters())
    sizes = sizes_from_components("gguf", "flux", {"transformer": transformer})
    assert sizes.components[0].bytes <= stored * 1.02
    report = eng.optimization_report(str(bfl_file))
    assert any("transformer kept as loaded (pre-quantized)" in line for line in report.memory_plan)
    assert eng.generate(model=str(bfl_file), **ARGS).images


def test_the_same_lora_again_and_again_on_gguf_weights(bfl_file, tmp_path):
    """A LoRA set used lora_fuse_after (3) times in a row is normally merged into the weights; GGUF blocks cannot
    take float deltas, so it stays unmerged and every request gives the same image."""
    from engine.testing import random_lora

    eng = Engine(device="cpu")
    eng.load(str(bfl_file), config="tiny-flux")
    lora = [{"path": str(random_lora("tiny-flux", tmp_path / "lora.safetensors")), "scale": 1.0}]
    images = [np.asarray(eng.generate(model=str(bfl_file), loras=lora, **ARGS).images[0]) for _ in range(5)]
    assert all(np.array_equal(images[0], im) for im in images[1:])
    assert not eng._slots[str(bfl_file)].loras.fused
    assert not np.array_equal(images[0], np.asarray(eng.generate(model=str(bfl_file), **ARGS).images[0]))
