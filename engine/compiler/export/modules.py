"""Stand-ins for exported components: torch modules the pipelines call exactly like the diffusers originals.

Each keeps the original's `config`, answers `.dtype` / `.device` / `next(parameters())` through an empty anchor
parameter, takes the original's call signature, and returns a tuple whose [0] is the output (or the diffusers output
class with `return_dict=True`). Arguments the exported graph cannot honour (ControlNet residuals, attention kwargs,
class labels) raise instead of being dropped. The module is bound to the device and precision it was built for.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Protocol

import torch

from .onnx_export import ExportSpec


class Runner(Protocol):
    """Runs an exported graph: reads named input tensors, writes the preallocated output tensor."""

    description: str  # e.g. "onnxruntime CPUExecutionProvider"

    def __call__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None: ...


def _reject(component: str, **unsupported: Any) -> None:
    for name, value in unsupported.items():
        if value is not None and value is not False and not (isinstance(value, dict) and not value):
            raise NotImplementedError(f"{component} runs as an exported graph, which does not take {name}; "
                                      "load the model with backend='torch' for this")


class ExportedModule(torch.nn.Module):
    """Common part: the runner, the spec, the original config, and the anchor that carries dtype and device."""

    def __init__(self, runner: Runner, spec: ExportSpec, original: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.runner = runner
        self.spec = spec
        self.config: Any = original.config
        self.anchor = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def _apply(self, fn: Any, recurse: bool = True) -> ExportedModule:
        moved = fn(self.anchor)
        if moved.device != self.anchor.device or moved.dtype != self.anchor.dtype:
            raise RuntimeError(f"{type(self).__name__} is an exported graph built for {self.device} "
                               f"{self.dtype}; load the model again to change either")
        return self

    def run(self, values: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Cast the inputs to the graph's dtypes, check them against the profile, run, return the new output."""
        extra = sorted(k for k, v in values.items() if v is not None and k not in self.spec.input_names)
        if extra:
            raise ValueError(f"{self.spec.component}: the exported graph takes no {', '.join(extra)}")
        inputs = {}
        for t in self.spec.inputs:
            value = values.get(t.name)
            if value is None:
                raise ValueError(f"{self.spec.component}: input {t.name} is required by the exported graph")
            inputs[t.name] = value.to(device=self.device, dtype=t.torch_dtype(self.dtype)).contiguous()
        self.spec.check(inputs)
        output = torch.empty(self.spec.output_shape(inputs), dtype=self.dtype, device=self.device)
        self.runner(inputs, output)
        return output

    def extra_repr(self) -> str:
        return f"{self.spec.component} on {self.runner.description}, {self.dtype}"

    # What diffusers' pipelines read from a denoiser besides its config: no IP-Adapter projection, no step cache.
    encoder_hid_proj = None
    is_cache_enabled = False

    def cache_context(self, name: str) -> Any:
        """diffusers' FLUX pipelines name each branch for step-cache hooks; an exported graph has none."""
        return contextlib.nullcontext()


def _batched(value: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Timesteps and guidance as the graph takes them: one float32 per batch row (scalars broadcast)."""
    tensor = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1)
    return tensor.expand(batch) if tensor.numel() == 1 else tensor


class ExportedUNet(ExportedModule):
    """UNet2DConditionModel's call signature over an exported UNet."""

    def __init__(self, runner: Runner, spec: ExportSpec, original: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(runner, spec, original, dtype, device)
        add = getattr(original, "add_embedding", None)
        if add is not None:  # read by the SDXL pipeline to check the text encoder fits the UNet
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=add.linear_1.in_features))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                down_block_additional_residuals: tuple[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        _reject("UNet", class_labels=class_labels, attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                encoder_attention_mask=encoder_attention_mask)
        added = added_cond_kwargs or {}
        out = self.run({"sample": sample, "timestep": _batched(timestep, sample.shape[0], sample.device),
                        "encoder_hidden_states": encoder_hidden_states, "timestep_cond": timestep_cond,
                        "text_embeds": added.get("text_embeds"), "time_ids": added.get("time_ids")})
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class ExportedFluxTransformer(ExportedModule):
    """FluxTransformer2DModel's call signature over an exported transformer."""

    def __init__(self, runner: Runner, spec: ExportSpec, original: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(runner, spec, original, dtype, device)
        self.out_channels = getattr(original, "out_channels", self.config.in_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
                controlnet_block_samples: Any = None, controlnet_single_block_samples: Any = None,
                return_dict: bool = True, controlnet_blocks_repeat: bool = False) -> Any:
        _reject("FLUX transformer", joint_attention_kwargs=joint_attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples)
        if guidance is not None and not self.config.guidance_embeds:
            raise ValueError("this FLUX transformer has no guidance embedding; pass guidance=None")
        batch = hidden_states.shape[0]
        ids = {k: v[0] if v is not None and v.ndim == 3 else v for k, v in (("txt_ids", txt_ids), ("img_ids", img_ids))}
        out = self.run({"hidden_states": hidden_states, "timestep": _batched(timestep, batch, hidden_states.device),
                        "guidance": None if guidance is None else _batched(guidance, batch, hidden_states.device),
                        "pooled_projections": pooled_projections, "encoder_hidden_states": encoder_hidden_states,
                        **ids})
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class ExportedVaeDecoder(ExportedModule):
    """AutoencoderKL's `decode` over an exported decoder. Encoding is not exported (no pipeline encodes yet)."""

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        out = self.run({"latents": z})
        if not return_dict:
            return (out,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=out)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("only the VAE decoder is exported; load the model with backend='torch' to encode")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("only the VAE decoder is exported: call .decode(latents)")
