"""Write diffusers components as one original-layout .safetensors file, the reverse of `single_file.py`.

SD 1.5 and SDXL are written in the A1111/ComfyUI (LDM/SGM) layout: `model.diffusion_model.*` UNet,
`first_stage_model.*` VAE, `cond_stage_model.transformer.*` (SD 1.5) or `conditioner.embedders.0.transformer.*` CLIP-L
and `conditioner.embedders.1.model.*` OpenCLIP-bigG (SDXL). FLUX writes its transformer in the BFL layout
(`double_blocks.*`, `single_blocks.*`, ...). The renames are written from the published key names; each function maps
every key or raises, so nothing is dropped silently and a round trip through `load_single_file` is exact.

The FLUX key table here is used in both directions (`flux_bfl_to_diffusers` is the loader's converter), because
diffusers' own FLUX converter hard-codes the 3072 hidden size and so cannot convert the tiny test models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..families import get_family

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------- UNet (LDM)

_UNET_TOP = {  # diffusers module path -> LDM module path
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = (  # inside a ResBlock
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_SUB = {"resnets": 0, "attentions": 1}


def _resnet_ldm(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest.startswith(new):
            return old + rest[len(new):]
    raise KeyError(rest)


def _unet_key(key: str, config: Mapping[str, Any]) -> str:
    """One diffusers UNet key -> its LDM key. Blocks are numbered flat in LDM: layers_per_block (+1 going up)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("the original UNet layout needs an integer layers_per_block")
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _resnet_ldm(rest) if kind == "resnets" else rest
        return f"input_blocks.{1 + b * (per_block + 1) + j}.{_SUB[kind]}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_ldm(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _resnet_ldm(rest) if kind == "resnets" else rest
        return f"output_blocks.{b * (per_block + 1) + j}.{_SUB[kind]}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, if the block has one
        return f"output_blocks.{b * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def unet_to_ldm(sd: StateDict, config: Mapping[str, Any]) -> StateDict:
    return _renamed(sd, lambda k: _unet_key(k, config), "UNet")


# ---------------------------------------------------------------------------------------------------- VAE (LDM)

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def _vae_key(key: str, num_up: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\..+|(post_)?quant_conv\..+", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # LDM numbers up blocks bottom-up
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    attn = r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)"
    if m := re.fullmatch(attn, key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(key)


def vae_to_ldm(sd: StateDict, config: Mapping[str, Any]) -> StateDict:
    """LDM's mid-block attention uses 1x1 convolutions, so its projection weights gain two trailing dims."""
    out = _renamed(sd, lambda k: _vae_key(k, len(config["up_block_types"])), "VAE")
    for key, value in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


# ------------------------------------------------------------------------------------------------ text encoders


def clip_to_ldm(sd: StateDict, config: Mapping[str, Any]) -> StateDict:
    """CLIP-L keeps the transformers 4 key names (`text_model.*`; transformers 5 dropped that wrapper) under its
    prefix."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def openclip_to_ldm(sd: StateDict, config: Mapping[str, Any]) -> StateDict:
    """OpenCLIP fuses q/k/v into `in_proj_*` and stores the projection as (width, embed_dim): the transpose."""
    out: StateDict = {}
    pending = dict(sd)
    for new, old in _OPENCLIP_TOP.items():
        out[old] = pending.pop(new)
    out["text_projection"] = pending.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(m[1]) for k in pending if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [pending.pop(f"{src}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        for key in [k for k in pending if k.startswith(src)]:
            rest = key[len(src):]
            new = next((o + rest[len(n):] for n, o in _OPENCLIP_LAYER.items() if rest.startswith(n)), None)
            if new is None:
                raise KeyError(f"OpenCLIP text encoder: no original name for {key!r}")
            out[dst + new] = pending.pop(key)
    if pending:
        raise KeyError(f"OpenCLIP text encoder: no original name for {sorted(pending)[:5]}")
    return out


# --------------------------------------------------------------------------------------------- FLUX (BFL layout)


@dataclass(frozen=True)
class FluxRule:
    """One BFL tensor and the diffusers tensors it holds. `{i}` is the block index, `{p}` weight|bias.

    op: "same" renames; "concat" stacks the parts along dim 0 (fused qkv, qkv+mlp); "swap" exchanges the two halves
    (BFL's final modulation is shift, scale; diffusers' is scale, shift).
    """

    bfl: str
    diffusers: tuple[str, ...]
    op: str = "same"


def _linear(bfl: str, *diffusers: str, op: str = "same") -> FluxRule:
    return FluxRule(bfl + ".{p}", tuple(d + ".{p}" for d in diffusers), op)


FLUX_GLOBAL_RULES: tuple[FluxRule, ...] = (
    _linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    _linear("txt_in", "context_embedder"),
    _linear("img_in", "x_embedder"),
    _linear("final_layer.linear", "proj_out"),
    _linear("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap"),
)
_D, _B = "double_blocks.{i}", "transformer_blocks.{i}"
FLUX_DOUBLE_RULES: tuple[FluxRule, ...] = (
    _linear(f"{_D}.img_mod.lin", f"{_B}.norm1.linear"),
    _linear(f"{_D}.txt_mod.lin", f"{_B}.norm1_context.linear"),
    _linear(f"{_D}.img_attn.qkv", f"{_B}.attn.to_q", f"{_B}.attn.to_k", f"{_B}.attn.to_v", op="concat"),
    _linear(f"{_D}.txt_attn.qkv", f"{_B}.attn.add_q_proj", f"{_B}.attn.add_k_proj", f"{_B}.attn.add_v_proj",
            op="concat"),
    FluxRule(f"{_D}.img_attn.norm.query_norm.scale", (f"{_B}.attn.norm_q.weight",)),
    FluxRule(f"{_D}.img_attn.norm.key_norm.scale", (f"{_B}.attn.norm_k.weight",)),
    FluxRule(f"{_D}.txt_attn.norm.query_norm.scale", (f"{_B}.attn.norm_added_q.weight",)),
    FluxRule(f"{_D}.txt_attn.norm.key_norm.scale", (f"{_B}.attn.norm_added_k.weight",)),
    _linear(f"{_D}.img_attn.proj", f"{_B}.attn.to_out.0"),
    _linear(f"{_D}.txt_attn.proj", f"{_B}.attn.to_add_out"),
    _linear(f"{_D}.img_mlp.0", f"{_B}.ff.net.0.proj"),
    _linear(f"{_D}.img_mlp.2", f"{_B}.ff.net.2"),
    _linear(f"{_D}.txt_mlp.0", f"{_B}.ff_context.net.0.proj"),
    _linear(f"{_D}.txt_mlp.2", f"{_B}.ff_context.net.2"),
)
_S, _T = "single_blocks.{i}", "single_transformer_blocks.{i}"
FLUX_SINGLE_RULES: tuple[FluxRule, ...] = (
    _linear(f"{_S}.modulation.lin", f"{_T}.norm.linear"),
    _linear(f"{_S}.linear1", f"{_T}.attn.to_q", f"{_T}.attn.to_k", f"{_T}.attn.to_v", f"{_T}.proj_mlp", op="concat"),
    FluxRule(f"{_S}.norm.query_norm.scale", (f"{_T}.attn.norm_q.weight",)),
    FluxRule(f"{_S}.norm.key_norm.scale", (f"{_T}.attn.norm_k.weight",)),
    _linear(f"{_S}.linear2", f"{_T}.proj_out"),
)


def _block_count(keys: Iterable[str], prefix: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def flux_rules(num_double: int, num_single: int) -> list[tuple[str, tuple[str, ...], str]]:
    """The FLUX table expanded to concrete keys: (bfl key, diffusers keys, op)."""
    expanded = []
    groups = ((FLUX_GLOBAL_RULES, 1), (FLUX_DOUBLE_RULES, num_double), (FLUX_SINGLE_RULES, num_single))
    for rules, count in groups:
        for i in range(count):
            for rule in rules:
                for p in ("weight", "bias") if "{p}" in rule.bfl else ("",):
                    fill = {"i": i, "p": p}
                    expanded.append((rule.bfl.format(**fill), tuple(d.format(**fill) for d in rule.diffusers), rule.op))
    return expanded


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_bfl(sd: StateDict, config: Mapping[str, Any] | None = None) -> StateDict:
    pending = dict(sd)
    out: StateDict = {}
    rules = flux_rules(_block_count(sd, "transformer_blocks"), _block_count(sd, "single_transformer_blocks"))
    for bfl, parts, op in rules:
        if not all(p in pending for p in parts):
            continue  # e.g. guidance_in on FLUX schnell
        tensors = [pending.pop(p) for p in parts]
        if op == "concat":
            out[bfl] = torch.cat(tensors, dim=0)
        else:
            out[bfl] = _swap_halves(tensors[0]) if op == "swap" else tensors[0]
    if pending:
        raise KeyError(f"FLUX transformer: no BFL name for {sorted(pending)[:5]}")
    return out


def flux_bfl_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> StateDict:
    """BFL keys (no prefix) -> diffusers keys. Fused tensors are split into views (no copy): q, k, v are each
    `hidden` rows, the MLP input of a single block takes the rest."""
    pending = dict(sd)
    hidden = sd["img_in.weight"].shape[0]
    out: StateDict = {}
    for bfl, parts, op in flux_rules(_block_count(sd, "double_blocks"), _block_count(sd, "single_blocks")):
        if bfl not in pending:
            continue
        t = pending.pop(bfl)
        if op == "concat":
            rest = t.shape[0] - hidden * (len(parts) - 1)
            out.update(zip(parts, torch.split(t, [hidden] * (len(parts) - 1) + [rest], dim=0)))
        else:
            out[parts[0]] = _swap_halves(t) if op == "swap" else t
    out.update(pending)  # unknown keys stay as they are, for the strict shape check to report
    return out


# ------------------------------------------------------------------------------------------------------ writing


def _renamed(sd: StateDict, rename: Callable[[str], str], what: str) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        try:
            out[rename(key)] = value
        except KeyError:
            raise KeyError(f"{what}: no original-layout name for {key!r}") from None
    return out


Writer = Callable[[StateDict, Mapping[str, Any]], StateDict]

# family -> (component, key prefix in the file, writer)
ORIGINAL_PARTS: dict[str, tuple[tuple[str, str, Writer], ...]] = {
    "sd15": (
        ("unet", "model.diffusion_model.", unet_to_ldm),
        ("vae", "first_stage_model.", vae_to_ldm),
        ("text_encoder", "cond_stage_model.transformer.", clip_to_ldm),
    ),
    "sdxl": (
        ("unet", "model.diffusion_model.", unet_to_ldm),
        ("vae", "first_stage_model.", vae_to_ldm),
        ("text_encoder", "conditioner.embedders.0.transformer.", clip_to_ldm),
        ("text_encoder_2", "conditioner.embedders.1.model.", openclip_to_ldm),
    ),
    "flux": (("transformer", "", flux_to_bfl),),
}


def _config_of(module: Any) -> Mapping[str, Any]:
    config = getattr(module, "config", {})
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def original_state_dict(components: Mapping[str, Any], family: str, only: Iterable[str] | None = None) -> StateDict:
    """The original-layout state dict of `components` (all file parts of the family, or just `only`)."""
    get_family(family)
    if family not in ORIGINAL_PARTS:
        raise ValueError(f"no original single-file layout for family {family!r}")
    wanted = set(only) if only is not None else None
    out: StateDict = {}
    for name, prefix, writer in ORIGINAL_PARTS[family]:
        if wanted is not None and name not in wanted:
            continue
        if name not in components:
            raise ValueError(f"components lack {name!r}, which the {family} single file holds")
        module = components[name]
        converted = writer(dict(module.state_dict()), _config_of(module))
        out.update({prefix + k: v for k, v in converted.items()})
    return out


def save_original_layout(components: Mapping[str, Any], family: str, path: str | Path, *,
                         only: Iterable[str] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write the family's unet/vae/text encoders (SD 1.5, SDXL) or FLUX transformer (BFL) as one .safetensors file.

    `only` restricts the file to some components (e.g. {"unet"}), as UNet-only checkpoints are published too.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = original_state_dict(components, family, only)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", **(metadata or {})})
    return path
