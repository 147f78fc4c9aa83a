"""Original-layout single files: layout detection, candidate choice by shapes, exact round trips, safety.

Everything runs on tiny random-weight models; the real architectures are only built on the meta device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import HubUnavailableError, ModelLoadError, UnsafeCheckpointError
from engine.families import get_family
from engine.loading.original_layout import (
    flux_bfl_to_diffusers,
    flux_rules,
    flux_to_bfl,
    original_state_dict,
    save_original_layout,
)
from engine.loading.pretrained import load_folder
from engine.loading.single_file import (
    LAYOUTS,
    Checkpoint,
    arch_candidates,
    build_meta_component,
    detect_layout,
    load_missing_components,
    load_single_file,
    load_single_file_component,
)
from engine.loading.tiny import ensure_tiny_model
from engine.paths import configs_dir

FAMILIES = ["sd15", "sdxl", "flux"]


@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[Path, dict]]:
    """family -> (tiny diffusers folder, its components loaded fp32)."""
    out = {}
    for fam in FAMILIES:
        folder = ensure_tiny_model(fam)
        out[fam] = (folder, load_folder(folder))
    return out


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single-files")
    return {fam: save_original_layout(tiny[fam][1], fam, root / f"{fam}.safetensors") for fam in FAMILIES}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tiny, files):
    folder, original = tiny[family]
    fam, loaded = load_single_file(files[family])  # default candidates: the real-arch folder first, then tiny
    assert fam == family
    assert list(loaded) == list(get_family(family).components)
    for name, obj in loaded.items():
        if isinstance(obj, torch.nn.Module):
            _assert_same_weights(obj, original[name])
            assert not any(t.is_meta for t in [*obj.parameters(), *obj.buffers()]), name
            assert not obj.training
    for name in ("tokenizer", "tokenizer_2"):
        if name in loaded:
            ids = loaded[name]("a lighthouse at dusk").input_ids
            assert len(ids) > 2 and ids == original[name]("a lighthouse at dusk").input_ids
    assert type(loaded["scheduler"]) is type(original["scheduler"])


def test_round_trip_file_is_stable(tiny, files, tmp_path):
    """Loading then saving again writes the same tensors under the same keys."""
    _, loaded = load_single_file(files["sdxl"])
    again = save_original_layout(loaded, "sdxl", tmp_path / "again.safetensors")
    a, b = Checkpoint(files["sdxl"]), Checkpoint(again)
    assert a.keys == b.keys
    ta, tb = a.tensors(a.keys), b.tensors(b.keys)
    assert all(torch.equal(ta[k], tb[k]) for k in a.keys)


def test_torch_dtype_cast(files):
    _, loaded = load_single_file(files["sd15"], torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded["unet"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded["text_encoder"].parameters()} == {torch.bfloat16}


def test_weights_are_mmapped(files):
    """The loaded parameters point into the file's mapping, not into a copy."""
    unet = load_single_file_component(files["sd15"], "unet", ensure_tiny_model("sd15"))
    ptr = unet.conv_in.weight.data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    if not maps:
        pytest.skip("no /proc/self/maps")
    regions = [line for line in maps if line.endswith(str(files["sd15"].resolve()))]
    assert any(int(r.split()[0].split("-")[0], 16) <= ptr < int(r.split()[0].split("-")[1], 16) for r in regions)


def test_unet_only_file(tiny, tmp_path):
    path = save_original_layout(tiny["sdxl"][1], "sdxl", tmp_path / "unet.safetensors", only={"unet"})
    assert detect_layout(Checkpoint(path).keys).family == "sdxl"
    unet = load_single_file_component(path, "unet", tiny["sdxl"][0])
    _assert_same_weights(unet, tiny["sdxl"][1]["unet"])
    with pytest.raises(ModelLoadError, match="holds no 'vae'"):
        load_single_file_component(path, "vae", tiny["sdxl"][0])


def test_diffusers_reads_our_unet_file(tiny, tmp_path):
    """Independent oracle: diffusers' own single-file loader reads what we write."""
    from diffusers import UNet2DConditionModel

    folder, original = tiny["sdxl"]
    path = save_original_layout(original, "sdxl", tmp_path / "unet.safetensors", only={"unet"})
    theirs = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                   local_files_only=True, torch_dtype=torch.float32)
    _assert_same_weights(theirs, original["unet"])


def test_flux_prefixed_layout(tiny, tmp_path):
    """ComfyUI saves the BFL transformer under `model.diffusion_model.`."""
    sd = original_state_dict(tiny["flux"][1], "flux")
    path = tmp_path / "flux-prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    fam, loaded = load_single_file(path, candidates=[tiny["flux"][0]])
    assert fam == "flux"
    _assert_same_weights(loaded["transformer"], tiny["flux"][1]["transformer"])


def test_extra_keys_of_real_files_are_tolerated(tiny, files, tmp_path):
    """A1111-era files carry CLIP's position_ids, the noise schedule and EMA bookkeeping beside the weights."""
    ckpt = Checkpoint(files["sd15"])
    sd = ckpt.tensors(ckpt.keys)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.ones(1000)
    sd["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / "a1111.safetensors"
    save_file(sd, str(path))
    _, loaded = load_single_file(path, candidates=[tiny["sd15"][0]])
    _assert_same_weights(loaded["text_encoder"], tiny["sd15"][1]["text_encoder"])


# ----------------------------------------------------------------------------------------------------- detection


def test_detection_table(files):
    for fam, path in files.items():
        keys = Checkpoint(path).keys
        matching = [layout.name for layout in LAYOUTS if layout.matches(keys)]
        assert len(matching) == 1, matching
        assert detect_layout(keys).family == fam


def test_unknown_layout(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_single_file(path)
    text = str(err.value)
    assert all(layout.name in text for layout in LAYOUTS)
    assert "input_blocks" in text and "double_blocks" in text  # says what it looked for


def test_sd2_style_file_is_not_sd15(files, tmp_path):
    """An OpenCLIP `cond_stage_model.model.*` encoder (SD 2.x) must not be taken for SD 1.5."""
    keys = Checkpoint(files["sd15"]).keys + ["cond_stage_model.model.token_embedding.weight"]
    with pytest.raises(ModelLoadError, match="cond_stage_model"):
        detect_layout(keys)


# --------------------------------------------------------------------------------------------------- candidates


def _copy_with_unet(folder: Path, target: Path, **changes) -> Path:
    shutil.copytree(folder, target)
    config_path = target / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return target


def test_shape_mismatch_candidate_is_skipped(tiny, files, tmp_path):
    wrong = _copy_with_unet(tiny["sd15"][0], tmp_path / "wrong", cross_attention_dim=48)
    fam, loaded = load_single_file(files["sd15"], candidates=[tiny["sdxl"][0], wrong, tiny["sd15"][0]])
    assert fam == "sd15"
    assert loaded["unet"].config.cross_attention_dim == 32
    _assert_same_weights(loaded["unet"], tiny["sd15"][1]["unet"])


def test_no_matching_candidate(tiny, files, tmp_path):
    wrong = _copy_with_unet(tiny["sd15"][0], tmp_path / "wrong", block_out_channels=[32, 32])
    with pytest.raises(ModelLoadError) as err:
        load_single_file(files["sd15"], candidates=[wrong, configs_dir() / "arch" / "sd15"])
    text = str(err.value)
    assert "no sd15 architecture config matches" in text and "config folder" in text
    assert str(wrong) in text and "unet: " in text


def test_arch_candidates_build_random_weight_models_only_when_reached(monkeypatch):
    import itertools

    from engine.loading import single_file
    from engine.registry import registry

    built: list[str] = []
    monkeypatch.setattr(single_file, "ensure_tiny_model", lambda name: built.append(name) or Path("/built") / name)
    sdxl = arch_candidates("sdxl")
    assert next(sdxl) == configs_dir() / "arch" / "sdxl" and not built  # shipped configs first, nothing built
    everything = [configs_dir() / "arch" / "sdxl", *sdxl]
    assert len(everything) == len(set(everything))  # sdxl and sdxl-turbo share one arch folder
    tiny = [s.tiny_config for s in registry().values() if s.family == "sdxl" and s.is_tiny]
    assert built == list(dict.fromkeys(tiny)) and {"sdxl", "sdxl-small"} <= set(built)
    assert [p.name for p in itertools.islice(arch_candidates("flux"), 2)] == ["flux-dev", "flux-schnell"]


def test_arch_folder_without_tokenizers_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as err:
        load_missing_components(configs_dir() / "arch" / "sd15", ["tokenizer", "scheduler"])
    assert "tokenizer" in str(err.value) and "stable-diffusion-v1-5" in str(err.value)


def test_arch_folder_scheduler_loads_offline():
    parts = load_missing_components(configs_dir() / "arch" / "flux-schnell", ["scheduler"])
    assert parts["scheduler"].config.shift == 1.0 and not parts["scheduler"].config.use_dynamic_shifting


# ------------------------------------------------------------------------------------------------------- safety


def test_pickle_refused_then_allowed(tiny, files, tmp_path):
    sd = Checkpoint(files["sd15"]).tensors(Checkpoint(files["sd15"]).keys)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, str(path))
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        load_single_file(path, candidates=[tiny["sd15"][0]])
    fam, loaded = load_single_file(path, candidates=[tiny["sd15"][0]], allow_pickle=True)
    assert fam == "sd15"
    _assert_same_weights(loaded["vae"], tiny["sd15"][1]["vae"])


def test_pickle_with_objects_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/")}, str(path))
    with pytest.raises(ModelLoadError, match="evil.pt"):
        load_single_file(path, allow_pickle=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors(files, tmp_path, damage):
    data = files["sd15"].read_bytes()
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x08\0\0\0\0\0\0\0{nojson}" + data[16:],
                      "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=f"{damage}.safetensors"):
        load_single_file(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such"):
        load_single_file(tmp_path / "nope.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="unsupported"):
        load_single_file(tmp_path / "x.onnx")


# ------------------------------------------------------------------------------------------ real architectures


@pytest.mark.parametrize(
    "arch, component, expected",
    [
        ("sd15", "unet", 859_520_964),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "text_encoder_2", 694_659_840),
        ("flux-dev", "transformer", 11_901_408_320),
        ("flux-schnell", "transformer", 11_891_178_560),  # no guidance embedder
        ("flux-dev", "text_encoder_2", 4_762_310_656),  # T5-XXL encoder, embeddings tied
        ("flux-dev", "vae", 83_819_683),
    ],
)
def test_real_arch_parameter_count(arch, component, expected):
    module = build_meta_component(configs_dir() / "arch" / arch, component)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_real_arch_original_keys():
    """Our writer produces the key names real checkpoints carry (diffusers' own detection markers among them)."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    def keys_of(arch: str, family: str, names: tuple[str, ...]) -> set[str]:
        parts = {n: build_meta_component(configs_dir() / "arch" / arch, n) for n in names}
        return set(original_state_dict(parts, family, only=names))

    sd15 = keys_of("sd15", "sd15", ("unet", "vae", "text_encoder"))
    assert {CHECKPOINT_KEY_NAMES["v1"], CHECKPOINT_KEY_NAMES["clip"],
            "model.diffusion_model.output_blocks.2.1.conv.weight",  # up block without attention: upsampler at .1
            "model.diffusion_model.output_blocks.5.2.conv.weight",
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"} <= sd15
    sdxl = keys_of("sdxl", "sdxl", ("unet", "text_encoder", "text_encoder_2"))
    assert {CHECKPOINT_KEY_NAMES["xl_base"], CHECKPOINT_KEY_NAMES["clip_sdxl"],
            CHECKPOINT_KEY_NAMES["open_clip_sdxl"], "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias"} <= sdxl
    flux = keys_of("flux-dev", "flux", ("transformer",))
    assert CHECKPOINT_KEY_NAMES["flux"][0] in flux and "single_blocks.37.linear1.weight" in flux


def test_flux_converter_agrees_with_diffusers():
    """Same keys and values as diffusers' converter at FLUX's real widths; each tensor is one column wide, since a
    key converter only slices rows."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as reference

    hidden, rows = 3072, {"qkv": 3 * 3072, "linear1": 3 * 3072 + 4 * 3072, "adaLN_modulation": 2 * 3072}
    sd = {}
    for bfl, _, _ in flux_rules(2, 2):
        n = next((v for k, v in rows.items() if k in bfl), 8)
        sd[bfl] = torch.arange(n * 1.0).reshape(n, 1) + len(sd)
    sd["img_in.weight"] = torch.zeros(hidden, 1)
    ours = flux_bfl_to_diffusers(dict(sd))
    theirs = reference(dict(sd))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = flux_to_bfl(ours)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "arch, family, names",
    [
        ("sd15", "sd15", ("unet", "vae", "text_encoder")),
        ("sdxl", "sdxl", ("unet", "vae", "text_encoder", "text_encoder_2")),
        ("flux-dev", "flux", ("transformer",)),
        ("flux-schnell", "flux", ("transformer",)),
    ],
)
def test_real_arch_file_picks_its_config(arch, family, names):
    """A full-size file (only its header: meta tensors) is matched to the right configs/arch folder, and schnell
    (no guidance embedder) is told apart from dev by its keys."""
    from types import SimpleNamespace

    from engine.loading.single_file import _choose, _file_parts

    parts = {n: build_meta_component(configs_dir() / "arch" / arch, n) for n in names}
    meta = original_state_dict(parts, family, only=names)
    fake = SimpleNamespace(path=Path(f"{arch}.safetensors"), meta=meta, keys=list(meta))
    layout = detect_layout(fake.keys)
    assert layout.family == family
    candidates = [configs_dir() / "arch" / a for a in ("sd15", "sdxl", "flux-dev", "flux-schnell")]
    chosen = _choose(candidates, family, _file_parts(layout, fake), fake)
    assert chosen.folder.name == arch
