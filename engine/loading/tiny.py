"""Seeded random-weight tiny models, built offline from configs/tiny/<name>.yaml.

A tiny model is written once to the cache as an ordinary diffusers folder (model_index.json, safetensors,
tokenizers) and from then on loaded through the same folder loader as any real model. The folder name carries a
hash of the config and corpus, so editing a config builds a fresh model instead of reusing a stale one.

A config's `kind` says what it builds: "pipeline" (the default; a whole model, optionally a `variant` such as an
inpainting UNet), "controlnet" (one ControlNet folder, as `save_pretrained` writes it) or "ip_adapter" (a folder in
h94/IP-Adapter's layout, which diffusers' `load_ip_adapter` reads). `extends: <name>` starts from another tiny
config and deep-merges this one over it, so a variant states only what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..families import get_family
from ..paths import cache_dir, configs_dir
from .classes import resolve_class
from .stock import build_stock_pipeline
from .tokenizers import TOKENIZER_BUILDERS, TRAINERS, frozen_path

BUILDER_VERSION = "3"  # bump when a builder changes what it writes


def tiny_config_path(name: str) -> Path:
    return configs_dir() / "tiny" / f"{name}.yaml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_config(name: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The config of `name` with its `extends` chain merged in, and the text of every file of the chain."""
    path = tiny_config_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no tiny config {path}")
    if name in seen:
        raise ValueError(f"tiny config {name!r} extends itself ({' -> '.join((*seen, name))})")
    text = path.read_text(encoding="utf-8")
    cfg = yaml.safe_load(text) or {}
    parent = cfg.pop("extends", None)
    if parent is None:
        return cfg, text
    base, base_text = _read_config(parent, (*seen, name))
    base.pop("variant", None)
    return _merge(base, cfg), base_text + "\n" + text


def _read(name: str) -> tuple[dict[str, Any], str, str]:
    cfg, text = _read_config(name)
    corpus = (configs_dir() / "tiny" / "corpus.txt").read_text(encoding="utf-8")
    return cfg, text, corpus


def tokenizer_specs(names: list[str] | None = None) -> list[tuple[str, str, int]]:
    """(kind, corpus, vocab size) of every tokenizer the tiny configs `names` (default: all) build."""
    folder = configs_dir() / "tiny"
    names = names or sorted(p.stem for p in folder.glob("*.yaml"))
    specs = set()
    for name in names:
        cfg, _, corpus = _read(name)
        for tok in cfg.get("tokenizers", {}).values():
            specs.add((tok["kind"], corpus, int(tok["vocab_size"])))
    return sorted(specs)


def tiny_kind(name: str) -> str:
    """What tiny config `name` builds: "pipeline", "controlnet" or "ip_adapter"."""
    return _read(name)[0].get("kind", "pipeline")


def tiny_model_dir(name: str) -> Path:
    """Where the built folder for tiny config `name` lives (it may not exist yet)."""
    _, text, corpus = _read(name)
    digest = hashlib.sha256((BUILDER_VERSION + text + corpus).encode()).hexdigest()[:12]
    return cache_dir() / "tiny" / f"{name}-{digest}"


def build_tiny_components(name: str) -> dict[str, Any]:
    """Instantiate the tiny pipeline's components with seeded random weights (in memory, fp32)."""
    cfg, _, corpus = _read(name)
    if cfg.get("kind", "pipeline") != "pipeline":
        raise ValueError(f"tiny config {name!r} is a {cfg['kind']}, not a pipeline")
    family = get_family(cfg["family"])
    torch.manual_seed(int(cfg.get("seed", 0)))
    parts: dict[str, Any] = {}
    for tok_name, tok_cfg in cfg.get("tokenizers", {}).items():
        tok_cfg = dict(tok_cfg)
        builder = TOKENIZER_BUILDERS[tok_cfg.pop("kind")]
        parts[tok_name] = builder(corpus, **tok_cfg)
    for comp_name, comp in cfg["components"].items():
        cls_name = comp["class"]
        config = dict(comp.get("config", {}))
        if comp_name == "scheduler":
            parts[comp_name] = resolve_class("diffusers", cls_name).from_config(config)
            continue
        if cls_name.startswith(("CLIP", "T5")):
            parts[comp_name] = _build_text_encoder(cls_name, config, parts[comp["tokenizer"]])
        else:
            parts[comp_name] = resolve_class("diffusers", cls_name)(**config)
    missing = [c for c in family.components if c not in parts]
    if missing:
        raise ValueError(f"tiny config {name!r} lacks components {missing} of family {family.name}")
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return parts


def _build_text_encoder(cls_name: str, config: dict[str, Any], tokenizer: Any) -> torch.nn.Module:
    import transformers

    vocab = len(tokenizer)
    if cls_name.startswith("CLIP"):
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        conf = transformers.CLIPTextConfig(vocab_size=vocab, **special, **config)
    else:
        conf = transformers.T5Config(
            vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config
        )
    return getattr(transformers, cls_name)(conf)


def save_as_diffusers_folder(family_name: str, parts: dict[str, Any], target: Path, variant: str = "") -> None:
    """Save components through the stock diffusers pipeline class (the variant's, e.g. StableDiffusionInpaintPipeline),
    so the folder is what diffusers itself writes, `_class_name` included."""
    pipeline_class = get_family(family_name).variant_pipeline(variant)
    build_stock_pipeline(family_name, parts, pipeline_class).save_pretrained(str(target), safe_serialization=True)


def build_tiny_controlnet(name: str) -> torch.nn.Module:
    """The ControlNet of tiny config `name`: the family's ControlNet class, seeded random weights (fp32)."""
    import diffusers

    cfg, _, _ = _read(name)
    family = get_family(cfg["family"])
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = getattr(diffusers, family.controlnet_class)(**cfg["model"]["config"]).eval()
    # A ControlNet starts as zero convolutions (its residuals add nothing until trained); a random test model must
    # add something, or a test could not tell a ControlNet that runs from one that is skipped.
    redraw = tuple(cfg["model"].get("redraw_zero_init", ()))
    for sub_name, sub in model.named_modules():
        if sub_name.startswith(redraw) and isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            sub.reset_parameters()
    return model


def tiny_unet_on_meta(name: str) -> torch.nn.Module:
    """The UNet of pipeline tiny config `name`, built on the meta device (its structure, no weights)."""
    import diffusers

    cfg, _, _ = _read(name)
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(cfg["components"]["unet"]["config"])


def build_tiny_ip_adapter(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The image encoder and the adapter weights of tiny config `name`, seeded.

    The weights are those of an original IP-Adapter checkpoint: `image_proj.proj` (image embedding -> `num_tokens`
    tokens of the UNet's cross-attention width) with `image_proj.norm`, and `ip_adapter.<k>.to_k_ip/to_v_ip` for each
    cross-attention layer in `attn_processors` order, k = 1, 3, 5, ... (the original numbering counted the
    self-attention layers too), which is how diffusers' `load_ip_adapter` reads them."""
    import transformers

    cfg, _, _ = _read(name)
    torch.manual_seed(int(cfg.get("seed", 0)))
    encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**cfg["image_encoder"]["config"])).eval()
    unet = tiny_unet_on_meta(cfg["unet_of"])
    cross = int(unet.config.cross_attention_dim)
    embed = int(encoder.config.projection_dim)
    tokens = int(cfg.get("num_tokens", 4))
    state: dict[str, torch.Tensor] = {
        "image_proj.proj.weight": torch.randn(cross * tokens, embed) / embed**0.5,
        "image_proj.proj.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    cross_attention = [p for p in unet.attn_processors if not p.endswith("attn1.processor")]
    for key_id, processor in zip(range(1, 2 * len(cross_attention), 2), cross_attention):
        hidden = int(unet.get_submodule(processor.removesuffix(".processor")).query_dim)
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(hidden, cross) / cross**0.5
    return encoder, state


def _write_pipeline(name: str, cfg: dict[str, Any], tmp: Path) -> None:
    save_as_diffusers_folder(cfg["family"], build_tiny_components(name), tmp, cfg.get("variant", ""))


def _write_controlnet(name: str, cfg: dict[str, Any], tmp: Path) -> None:
    build_tiny_controlnet(name).save_pretrained(str(tmp), safe_serialization=True)


def _write_ip_adapter(name: str, cfg: dict[str, Any], tmp: Path) -> None:
    from safetensors.torch import save_file

    encoder, state = build_tiny_ip_adapter(name)
    sub = tmp / cfg["subfolder"]
    encoder.save_pretrained(str(sub / cfg.get("image_encoder_folder", "image_encoder")), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(sub / cfg["weight_name"]))


# kind -> (writer, the file whose presence means the folder is complete)
_WRITERS = {
    "pipeline": (_write_pipeline, lambda cfg: "model_index.json"),
    "controlnet": (_write_controlnet, lambda cfg: "config.json"),
    "ip_adapter": (_write_ip_adapter, lambda cfg: f"{cfg['subfolder']}/{cfg['weight_name']}"),
}


def ensure_tiny_model(name: str) -> Path:
    """Return the folder of tiny model `name`, building and writing it first if needed (atomic rename)."""
    target = tiny_model_dir(name)
    cfg, _, _ = _read(name)
    kind = cfg.get("kind", "pipeline")
    if kind not in _WRITERS:
        raise ValueError(f"tiny config {name!r} has kind {kind!r}; known: {', '.join(_WRITERS)}")
    write, marker = _WRITERS[kind]
    if (target / marker(cfg)).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write(name, cfg, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / marker(cfg)).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def freeze_tokenizers(names: list[str] | None = None) -> list[Path]:
    """Train and write the frozen vocabulary of every tokenizer the tiny configs use that has none yet (a
    maintainer's step after changing the corpus or a size; the files are package data: see tokenizers.py)."""
    written = []
    for kind, corpus, vocab_size in tokenizer_specs(names):
        path = frozen_path(kind, corpus, vocab_size)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TRAINERS[kind](corpus, vocab_size), ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for written_path in freeze_tokenizers(sys.argv[1:] or None):
        print(written_path)
