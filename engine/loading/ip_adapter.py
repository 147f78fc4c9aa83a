"""Resolve an IP-Adapter named by a request to what diffusers' `load_ip_adapter` reads.

Registry entries carry the layout of h94/IP-Adapter as data (`subfolder`, `weight_name`, `image_encoder_folder`);
a trusted caller may also name a local weights file (`<folder>/<subfolder>/<weight>.safetensors`, the image encoder
in `image_encoder/` beside it). The adapter's cross-attention width is read from the file's header, so an adapter
for another model is a 422 naming the field before the UNet's attention processors are swapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelLoadError
from ..families import get_family
from .adjuncts import hub_snapshot, resolve_adjunct


@dataclass(frozen=True)
class IPAdapterSource:
    """Arguments of `pipe.load_ip_adapter(folder, subfolder=..., weight_name=..., image_encoder_folder=...)`."""

    folder: Path
    subfolder: str
    weight_name: str
    image_encoder_folder: str
    cross_attention_dim: int  # the UNet cross-attention width the adapter was trained for
    image_embed_dim: int  # the image encoder projection width it expects

    def load_kwargs(self) -> dict[str, Any]:
        return {"pretrained_model_name_or_path_or_dict": str(self.folder), "subfolder": self.subfolder,
                "weight_name": self.weight_name, "image_encoder_folder": self.image_encoder_folder,
                "local_files_only": True}

    def load_into(self, pipe: Any) -> None:
        """Load this adapter into a stock diffusers pipeline (its UNet's attention processors, image encoder)."""
        pipe.load_ip_adapter(**self.load_kwargs())


def _header(weights: Path, field: str) -> tuple[int, int]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shape = f.get_slice("image_proj.proj.weight").get_shape()
    except Exception as e:  # noqa: BLE001 - not safetensors, truncated, or another kind of adapter
        raise InvalidRequestError(field, f"{weights.name} is not an IP-Adapter this engine loads "
                                  f"(image_proj.proj.weight: {type(e).__name__})") from None
    tokens = 4  # diffusers' ImageProjection for plain IP-Adapters: 4 image tokens
    return int(shape[0]) // tokens, int(shape[1])


def resolve_ip_adapter(source: str, *, family: str, field: str = "ip_adapter.model") -> IPAdapterSource:
    """Where the IP-Adapter `source` is, for a `family` model and the current caller; 422 naming `field` when the
    caller may not use it, or it is for another family."""
    get_family(family)
    resolved = resolve_adjunct(source, "ip_adapter", field)
    spec = resolved.spec
    if spec is not None:
        if spec.family != family:
            raise InvalidRequestError(field, f"IP-Adapter {source!r} is for {spec.family} models, not {family}",
                                      value=source)
        sub, weight, enc = spec.subfolder or "", spec.weight_name or "", spec.image_encoder_folder or "image_encoder"
        if resolved.folder is not None:
            folder = resolved.folder
        else:
            enc_path = enc if "/" in enc else f"{sub}/{enc}".lstrip("/")
            patterns = [f"{sub}/{weight}".lstrip("/"), f"{enc_path}/config.json", f"{enc_path}/*.safetensors"]
            folder = hub_snapshot(resolved.hub_id or "", patterns, field)
    elif resolved.how == "local" and resolved.folder is not None and resolved.folder.is_file():
        weights = resolved.folder
        if weights.suffix != ".safetensors":
            raise InvalidRequestError(field, "an IP-Adapter file must be .safetensors")
        folder, sub, weight, enc = weights.parent.parent, weights.parent.name, weights.name, "image_encoder"
    else:
        raise InvalidRequestError(field, "an IP-Adapter is a registered id, or (trusted callers) a local "
                                  "<folder>/<subfolder>/<weights>.safetensors with image_encoder/ beside it")
    weights = folder / sub / weight
    if not weights.is_file():
        raise ModelLoadError(f"IP-Adapter {source!r}: {weights} is missing")
    cross, embed = _header(weights, field)
    return IPAdapterSource(folder, sub, weight, enc, cross, embed)


def check_ip_adapter_fits(adapter: IPAdapterSource, unet: Any, field: str = "ip_adapter.model") -> None:
    """A 422 naming `field` when the adapter's image tokens do not have the UNet's cross-attention width."""
    width = unet.config.cross_attention_dim
    if adapter.cross_attention_dim != width:
        raise InvalidRequestError(field, f"the IP-Adapter makes {adapter.cross_attention_dim}-wide image tokens; "
                                  f"the model's UNet attends over {width}; it was trained for another model")
