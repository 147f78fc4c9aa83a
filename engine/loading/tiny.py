"""Seeded random-weight tiny models, built offline from configs/tiny/<name>.yaml.

A tiny model is written once to the cache as an ordinary diffusers folder (model_index.json, safetensors,
tokenizers) and from then on loaded through the same folder loader as any real model. The folder name carries a
hash of the config and corpus, so editing a config builds a fresh model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
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
from .tokenizers import TOKENIZER_BUILDERS

BUILDER_VERSION = "1"


def tiny_config_path(name: str) -> Path:
    return configs_dir() / "tiny" / f"{name}.yaml"


def _read(name: str) -> tuple[dict[str, Any], str, str]:
    path = tiny_config_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no tiny config {path}")
    text = path.read_text(encoding="utf-8")
    corpus = (configs_dir() / "tiny" / "corpus.txt").read_text(encoding="utf-8")
    return yaml.safe_load(text), text, corpus


def tiny_model_dir(name: str) -> Path:
    """Where the built folder for tiny config `name` lives (it may not exist yet)."""
    _, text, corpus = _read(name)
    digest = hashlib.sha256((BUILDER_VERSION + text + corpus).encode()).hexdigest()[:12]
    return cache_dir() / "tiny" / f"{name}-{digest}"


def build_tiny_components(name: str) -> dict[str, Any]:
    """Instantiate the tiny pipeline's components with seeded random weights (in memory, fp32)."""
    cfg, _, corpus = _read(name)
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


def save_as_diffusers_folder(family_name: str, parts: dict[str, Any], target: Path) -> None:
    """Save components through the stock diffusers pipeline class, so the folder is what diffusers itself writes."""
    build_stock_pipeline(family_name, parts).save_pretrained(str(target), safe_serialization=True)


def ensure_tiny_model(name: str) -> Path:
    """Return the folder of tiny model `name`, building and writing it first if needed (atomic rename)."""
    target = tiny_model_dir(name)
    if (target / "model_index.json").is_file():
        return target
    cfg, _, _ = _read(name)
    parts = build_tiny_components(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        save_as_diffusers_folder(cfg["family"], parts, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
