"""How the kernels enter a model: engine-owned module subclasses swapped in for diffusers' modules, and back out.

The mechanism (documented, removable, no library class is patched):
- A swap builds a new instance of an engine subclass of the library class that shares the original's children,
  parameters and buffers (the same tensor objects, under the same names), and sets it on the parent in place of the
  original. `state_dict()` keys and values are unchanged, `isinstance` checks against the library class still hold,
  and anything that wraps a child later (peft's LoRA layers, torchao's quantized weights, offload hooks) wraps the
  child the fused module calls.
- `remove_kernels(model)` rebuilds every swapped module as its library class the same way (with the children it has
  now, so a LoRA loaded in between stays), and puts the original attention processors back.
- Modules with hooks already installed on them (accelerate / diffusers offload, which replace the instance's
  `forward`) are left alone and counted: the compiler runs this pass before placing components.

What is fused, per library module:
- `ResnetBlock2D` (UNet and VAE): its forward calls `norm1` then `nonlinearity` (and `norm2` then `nonlinearity`)
  as separate children, and also applies `nonlinearity` to the time embedding, so the activation child cannot
  become an identity. The block is swapped for `FusedResnetBlock2D`, whose forward is diffusers' with the two
  hidden-state activations folded into the norms, and `norm1`/`norm2` for `GroupNormSiLU` (GroupNorm + SiLU in one
  op). Only blocks with a SiLU activation and affine GroupNorms are swapped, and not "scale_shift" blocks (their
  time embedding modulates between the norm and the activation).
- `AdaLayerNormZero`, `AdaLayerNormZeroSingle`, `AdaLayerNormContinuous` (FLUX): LayerNorm + modulation in one op;
  the modulation projection stays the module's `linear` child.
- `FluxAttention` with diffusers' `FluxAttnProcessor`: an engine processor (`FusedFluxAttnProcessor`, set through
  diffusers' `set_processor`) that normalizes and rotates q and k in one op through `norm_q`/`norm_k`/
  `norm_added_q`/`norm_added_k`, swapped for `RMSNormRoPE` (the same weights). It keeps the dispatcher backend the
  attention pass chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections

from . import group_norm_silu as _gn  # noqa: F401  (registers torch.ops.engine_kernels.*)
from . import layer_norm_modulate as _ln  # noqa: F401
from . import rms_norm_rope as _rr  # noqa: F401

ops = torch.ops.engine_kernels


def rebuild_as(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """A new `cls` instance sharing `module`'s state: the same children, parameters, buffers and attributes (the
    containers copied, their contents shared)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()})
    return new


def has_hooks(module: torch.nn.Module) -> bool:
    """Offload / cache hooks replace the instance's forward (accelerate) or hold a hook registry (diffusers)."""
    return "forward" in module.__dict__ or hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")


# -- fused modules ---------------------------------------------------------------------------------------------


class GroupNormSiLU(torch.nn.GroupNorm):
    """GroupNorm followed by SiLU, one op. State-dict compatible with nn.GroupNorm."""

    engine_original = torch.nn.GroupNorm
    engine_kernel = "group_norm_silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, True)


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D forward (any time-embedding norm but "scale_shift") with `norm1`/`norm2` being
    GroupNormSiLU: the activations after them are inside the norms; the time embedding's is still `nonlinearity`."""

    engine_original = ResnetBlock2D
    engine_kernel = "group_norm_silu"

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if temb is not None and self.time_embedding_norm == "default":
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def _norm_args(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    return norm.weight, norm.bias, norm.eps


class FusedAdaLayerNormZero(AdaLayerNormZero):
    engine_original = AdaLayerNormZero
    engine_kernel = "layer_norm_modulate"

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = ops.layer_norm_modulate(x, scale_msa, shift_msa, *_norm_args(self.norm))
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    engine_original = AdaLayerNormZeroSingle
    engine_kernel = "layer_norm_modulate"

    def forward(self, x, emb=None):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        return ops.layer_norm_modulate(x, scale_msa, shift_msa, *_norm_args(self.norm)), gate_msa


class FusedAdaLayerNormContinuous(AdaLayerNormContinuous):
    engine_original = AdaLayerNormContinuous
    engine_kernel = "layer_norm_modulate"

    def forward(self, x, conditioning_embedding):
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return ops.layer_norm_modulate(x, scale, shift, *_norm_args(self.norm))


class RMSNormRoPE(torch.nn.RMSNorm):
    """torch.nn.RMSNorm that also applies the rotary embedding `rope=(cos, sin)` when given, in one op."""

    engine_original = torch.nn.RMSNorm
    engine_kernel = "rms_norm_rope"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        cos, sin = rope if rope is not None else (None, None)
        return ops.rms_norm_rope(x, self.weight, cos, sin, eps)


class FusedFluxAttnProcessor:
    """diffusers' FluxAttnProcessor with q/k RMSNorm + RoPE fused (through the RMSNormRoPE norms of `attn`); text
    and image tokens are normalized with their own weights and rotated with their slice of the embedding."""

    _attention_backend = None
    _parallel_config = None
    engine_kernel = "rms_norm_rope"

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        rope_img = image_rotary_emb
        if attn.added_kv_proj_dim is not None:
            n_txt = encoder_query.shape[1]
            rope_txt = None
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb
                rope_txt, rope_img = (cos[:n_txt], sin[:n_txt]), (cos[n_txt:], sin[n_txt:])
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)), rope_txt)
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)), rope_txt)
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, attn.norm_q(query, rope_img)], dim=1)
            key = torch.cat([encoder_key, attn.norm_k(key, rope_img)], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        else:
            query = attn.norm_q(query, rope_img)
            key = attn.norm_k(key, rope_img)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# -- the swap table --------------------------------------------------------------------------------------------


def _resnet_unfit(m: ResnetBlock2D) -> str | None:
    if not isinstance(m.nonlinearity, torch.nn.SiLU):
        return f"activation {type(m.nonlinearity).__name__}, not SiLU"
    if m.time_embedding_norm == "scale_shift":  # modulates between the norm and the activation
        return "time_embedding_norm='scale_shift'"
    if not all(type(n) is torch.nn.GroupNorm and n.affine for n in (m.norm1, m.norm2)):
        return "norms are not affine nn.GroupNorm"
    return None


def _ada_unfit(m: torch.nn.Module) -> str | None:
    if type(getattr(m, "norm", None)) is not torch.nn.LayerNorm:
        return f"norm is {type(getattr(m, 'norm', None)).__name__}, not nn.LayerNorm"
    if getattr(m, "emb", None) is not None:
        return "embeds the timestep itself"
    return None


def _attention_unfit(m: FluxAttention) -> str | None:
    if type(m.processor) is not FluxAttnProcessor:
        return f"processor {type(m.processor).__name__}"
    norms = [getattr(m, n, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    if not all(type(n) is torch.nn.RMSNorm for n in norms[:2]) or (
            m.added_kv_proj_dim is not None and not all(type(n) is torch.nn.RMSNorm for n in norms[2:])):
        return "q/k norms are not nn.RMSNorm"
    if m.head_dim % 2:
        return f"odd head dimension {m.head_dim}"
    return None


@dataclass(frozen=True)
class Swap:
    """One library module class, the engine subclass that replaces it, and when it fits."""

    kernel: str
    target: type[torch.nn.Module]
    fused: type[torch.nn.Module]
    unfit: Callable[[torch.nn.Module], str | None]
    children: tuple[tuple[str, type[torch.nn.Module]], ...] = ()  # children swapped along with the module


SWAPS: tuple[Swap, ...] = (
    Swap("group_norm_silu", ResnetBlock2D, FusedResnetBlock2D, _resnet_unfit,
         (("norm1", GroupNormSiLU), ("norm2", GroupNormSiLU))),
    Swap("layer_norm_modulate", AdaLayerNormZero, FusedAdaLayerNormZero, _ada_unfit),
    Swap("layer_norm_modulate", AdaLayerNormZeroSingle, FusedAdaLayerNormZeroSingle, _ada_unfit),
    Swap("layer_norm_modulate", AdaLayerNormContinuous, FusedAdaLayerNormContinuous, _ada_unfit),
)
ATTENTION_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@dataclass
class KernelUse:
    """Per kernel: where it was swapped in (module paths by library class), and what was left alone and why."""

    replaced: dict[str, list[str]] = field(default_factory=dict)  # library class -> module paths
    left: dict[str, list[str]] = field(default_factory=dict)  # reason -> module paths

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.replaced.values())


def _parents(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    out = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            out.append((f"{path}.{name}" if path else name, parent, name, child))
    return out


def apply_kernels(model: torch.nn.Module, kernels: frozenset[str] | None = None) -> dict[str, KernelUse]:
    """Swap every module of `model` that a kernel fits for its fused engine module; returns per kernel where."""
    uses: dict[str, KernelUse] = {}
    for path, parent, name, child in _parents(model):
        for swap in SWAPS:
            if type(child) is not swap.target or (kernels is not None and swap.kernel not in kernels):
                continue
            use = uses.setdefault(swap.kernel, KernelUse())
            why = "hooks installed" if has_hooks(child) else swap.unfit(child)
            if why:
                use.left.setdefault(why, []).append(path)
                continue
            for child_name, cls in swap.children:
                setattr(child, child_name, rebuild_as(getattr(child, child_name), cls))
            setattr(parent, name, rebuild_as(child, swap.fused))
            use.replaced.setdefault(swap.target.__name__, []).append(path)
    if kernels is None or "rms_norm_rope" in kernels:
        for path, module in model.named_modules():
            if type(module) is not FluxAttention:
                continue
            use = uses.setdefault("rms_norm_rope", KernelUse())
            why = _attention_unfit(module)
            if why:
                use.left.setdefault(why, []).append(path)
                continue
            for n in ATTENTION_NORMS:
                norm = getattr(module, n, None)
                if isinstance(norm, torch.nn.RMSNorm):
                    setattr(module, n, rebuild_as(norm, RMSNormRoPE))
            old = module.processor
            new = FusedFluxAttnProcessor()
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            module.set_processor(new)
            use.replaced.setdefault("FluxAttention", []).append(path)
    return uses


def remove_kernels(model: torch.nn.Module) -> int:
    """Put the library modules and processors back (sharing the current children and weights); returns how many
    modules were restored. A model without kernels is left as it is."""
    restored = 0
    for _, parent, name, child in reversed(_parents(model)):  # children before the modules that hold them
        original = getattr(type(child), "engine_original", None)
        if original is not None:
            setattr(parent, name, rebuild_as(child, original))
            restored += 1
    for module in model.modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, FusedFluxAttnProcessor):
            old = module.processor
            new = FluxAttnProcessor()
            new._attention_backend = old._attention_backend
            new._parallel_config = old._parallel_config
            module.set_processor(new)
            restored += 1
    return restored


def kernel_count(model: torch.nn.Module) -> int:
    """How many engine kernel modules and processors `model` holds."""
    return sum(1 for m in model.modules() if getattr(type(m), "engine_original", None) is not None) + sum(
        1 for m in model.modules() if isinstance(getattr(m, "processor", None), FusedFluxAttnProcessor))
