"""fuse_qkv and channels_last passes: lossless rewrites of the weights' layout.

fuse_qkv concatenates the query/key/value projections into one matmul (diffusers' `fuse_qkv_projections`) and then
drops the separate projections, so a fused model holds each weight once. `unfuse_qkv` splits the fused weights back
into separate q/k/v layers (LoRA adapters are injected into those) and restores the unfused attention path.
channels_last stores conv activations NHWC, which cuDNN and oneDNN convolutions prefer.
"""

from __future__ import annotations

import torch

from .context import PassContext

# fused layer -> the projections diffusers concatenated into it, in order
FUSED_GROUPS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
SPLITS_ATTR = "engine_fused_splits"  # on an attention module: {fused layer: ((projection, out_features), ...)}


def apply_fuse_qkv(ctx: PassContext) -> None:
    if not ctx.config.fuse_qkv:
        ctx.report.skipped("fuse_qkv", "disabled in config")
        return
    fused, unable = [], []
    for name, module in ctx.modules(ctx.family.denoiser, "vae"):
        quantized = quantized_projection(module)
        if not hasattr(module, "fuse_qkv_projections"):
            unable.append(f"{name} does not support fused projections")
        elif quantized:
            unable.append(f"{name}: q/k/v weights are stored quantized ({quantized}); concatenating them would "
                          "make a plain Linear of the raw storage")
        else:
            fused.append(f"{name} ({fuse_qkv(module)} separate projections dropped)")
    if fused:
        ctx.report.applied("fuse_qkv", "fused q/k/v projections in " + ", ".join(fused)
                           + (f" ({'; '.join(unable)})" if unable else ""))
    else:
        ctx.report.skipped("fuse_qkv", "; ".join(unable) or "no component to fuse")


def quantized_projection(model: torch.nn.Module) -> str | None:
    """How the first attention projection (separate or fused) whose weight is not a plain float tensor is stored (GGUF
    blocks, torchao tensors), or None when every q/k/v weight is plain."""
    parts = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", *FUSED_GROUPS)
    for module in model.modules():
        for part in parts:
            weight = getattr(getattr(module, part, None), "weight", None)
            if isinstance(weight, torch.Tensor) and not (
                    type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.is_floating_point()):
                return f"{type(weight).__name__} {str(weight.dtype).removeprefix('torch.')}"
    return None


def fuse_qkv(model: torch.nn.Module) -> int:
    """Fuse with diffusers, then drop the separate layers; returns how many were dropped."""
    model.fuse_qkv_projections()
    return drop_unfused_projections(model)


def drop_unfused_projections(model: torch.nn.Module) -> int:
    """After diffusers fused a model, delete the q/k/v layers the fused path no longer calls (diffusers keeps them:
    +4.3 GB on FLUX-dev), remembering each one's output width so `unfuse_qkv` can split them back out."""
    dropped = 0
    for module in model.modules():
        splits = getattr(module, SPLITS_ATTR, None) or {}
        for fused_name, parts in FUSED_GROUPS.items():
            fused = getattr(module, fused_name, None)
            if not isinstance(fused, torch.nn.Linear) or fused_name in splits:
                continue
            layers = [getattr(module, p, None) for p in parts]
            if not all(isinstance(layer, torch.nn.Linear) for layer in layers):
                continue
            if sum(layer.out_features for layer in layers) != fused.out_features:
                continue  # not the concatenation of these layers: leave both alone
            splits[fused_name] = tuple((p, layer.out_features) for p, layer in zip(parts, layers))
        if splits:
            setattr(module, SPLITS_ATTR, splits)
            for fused_name, parts in splits.items():
                for part, _ in parts:
                    if isinstance(getattr(module, part, None), torch.nn.Linear):
                        delattr(module, part)
                        dropped += 1
    return dropped


def is_fused(model: torch.nn.Module) -> bool:
    return any(getattr(m, SPLITS_ATTR, None) for m in model.modules())


@torch.no_grad()
def unfuse_qkv(model: torch.nn.Module) -> int:
    """Split every fused projection of `model` back into its q/k/v layers (exact: the same values, each held once)
    and route attention through them again. Returns how many fused layers were split."""
    count = 0
    for module in model.modules():
        splits = getattr(module, SPLITS_ATTR, None)
        if not splits:
            continue
        for fused_name, parts in splits.items():
            fused = getattr(module, fused_name)
            sizes = [n for _, n in parts]
            weights = fused.weight.split(sizes, dim=0)
            biases = fused.bias.split(sizes, dim=0) if fused.bias is not None else [None] * len(parts)
            for (part, out_features), w, b in zip(parts, weights, biases):
                layer = torch.nn.Linear(fused.in_features, out_features, bias=b is not None, device="meta")
                layer.weight = torch.nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
                if b is not None:
                    layer.bias = torch.nn.Parameter(b.clone(), requires_grad=fused.bias.requires_grad)
                setattr(module, part, layer)
            delattr(module, fused_name)
            count += 1
        delattr(module, SPLITS_ATTR)
        module.fused_projections = False
    if count:
        _restore_unfused_processors(model)
    return count


def _restore_unfused_processors(model: torch.nn.Module) -> None:
    """Classic attention (the UNet's `Attention`) picks fused or not by processor class: put back the processors
    diffusers saved when fusing. Dispatcher attention (FLUX) reads `fused_projections`, already cleared."""
    original = getattr(model, "original_attn_processors", None)
    if original:
        model.set_attn_processor(original)
        model.original_attn_processors = None


def _has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def apply_channels_last(ctx: PassContext) -> None:
    if not ctx.config.channels_last:
        ctx.report.skipped("channels_last", "disabled in config")
        return
    done, skipped = [], []
    for name, module in ctx.modules(ctx.family.denoiser, "vae"):
        if _has_conv(module):
            module.to(memory_format=torch.channels_last)
            done.append(name)
        else:
            skipped.append(f"{name} has no convolutions")
    if done:
        ctx.report.applied("channels_last", ", ".join(done) + (f" ({'; '.join(skipped)})" if skipped else ""))
    else:
        ctx.report.skipped("channels_last", "; ".join(skipped))
