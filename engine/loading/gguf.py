"""Load GGUF single files (city96's FLUX.1 dev/schnell transformers: Q8_0, Q4_K, ...) through diffusers' GGUF support.

A GGUF file holds only the transformer. Its tensors are handed to diffusers as `GGUFParameter`s (the quantized blocks,
as stored) and `FluxTransformer2DModel.from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` swaps
each Linear for a `GGUFLinear` that dequantizes its weight per call in the compute dtype: the weights stay quantized
in memory. The other components (VAEs, text encoders, tokenizers, scheduler) come from the chosen config folder or
its registry hub source, as for a safetensors transformer (`single_file.load_missing_components`).

What we add to diffusers' loader:
- detection: the key layout (BFL `double_blocks.*` or diffusers `transformer_blocks.*`) from the header alone; any
  other family is refused with a clear error (SDXL GGUF UNets exist, but no loader here takes them);
- the architecture: candidate config folders are matched against the file's *logical* shapes (GGUF stores the
  unquantized shape in its tensor info; the data are bytes), so a schnell file gets the schnell config and a tiny
  test file the tiny config;
- BFL keys are converted with our own table (`flux_bfl_to_diffusers`): diffusers' converter hard-codes FLUX's 3072
  hidden size. Splitting a fused qkv along rows is exact on quantized data (GGUF blocks run along the last dim);
- the tensors are zero-copy views of the file's memory map (diffusers' `load_gguf_checkpoint` copies every tensor),
  so loading costs page cache, not a second copy of the file;
- quantized tensors that are not 2-D (a BF16 norm scale or bias) are dequantized up front: diffusers would hand the
  raw bytes to a norm layer or add them as a bias.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ModelLoadError
from ..families import get_family
from .dtypes import TorchDtype, component_dtype, folder_config, load_quantization
from .original_layout import flux_bfl_to_diffusers
from .pretrained import folder_family
from .single_file import _shape_mismatch, arch_candidates, build_meta_component, load_missing_components

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
COMPONENT = "transformer"
_PREFIX = "model.diffusion_model."  # ComfyUI-style checkpoints prefix the transformer's keys
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GGUFLayout:
    """A key layout a FLUX transformer GGUF file may use, and how its keys become diffusers keys."""

    name: str
    required: tuple[str, ...]  # regexes: each must match some key (after the prefix is stripped)
    forbidden: tuple[str, ...]  # regexes: none may match (FLUX.2 shares FLUX.1's block names)
    to_diffusers: Callable[[Mapping[str, torch.Tensor]], StateDict]

    def matches(self, keys: Sequence[str]) -> bool:
        has = lambda p: any(re.search(p, k) for k in keys)  # noqa: E731
        return all(has(p) for p in self.required) and not any(has(p) for p in self.forbidden)


LAYOUTS: tuple[GGUFLayout, ...] = (
    GGUFLayout("flux-bfl", (r"^double_blocks\.0\.img_attn\.qkv\.weight$", r"^single_blocks\.0\.linear1\.weight$",
                            r"^img_in\.weight$"),
               (r"^single_stream_modulation\.",), flux_bfl_to_diffusers),
    GGUFLayout("flux-diffusers", (r"^transformer_blocks\.0\.attn\.to_q\.weight$",
                                  r"^single_transformer_blocks\.0\.attn\.to_q\.weight$", r"^x_embedder\.weight$"),
               (r"^double_stream_modulation", r"^single_stream_modulation"), dict),
)


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


class GGUFFile:
    """One GGUF file: its metadata, and per tensor the logical shape (from the tensor info) and, on demand, the data
    as views of a copy-on-write memory map (nothing is read until used; nothing is ever written back)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            import gguf
        except ImportError:
            raise ModelLoadError(f"{self.path}: loading GGUF files needs the `gguf` package "
                                 "(pip install 'engine[gguf]')") from None
        try:
            with self.path.open("rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelLoadError(f"{self.path}: cannot read ({e})") from None
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self._reader = gguf.GGUFReader(str(self.path), mode="c")
            tensors = {self._strip(t.name): t for t in self._reader.tensors}
            self.shapes = {k: tuple(int(d) for d in reversed(t.shape.tolist())) for k, t in tensors.items()}
        except Exception as e:  # truncated (the memmap ends inside a tensor), bad header, duplicate names
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._tensors = tensors

    @staticmethod
    def _strip(name: str) -> str:
        return name[len(_PREFIX):] if name.startswith(_PREFIX) else name

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    def architecture(self) -> str | None:
        """`general.architecture` (city96 writes "flux", "sdxl", ...; llama.cpp files name their LLM)."""
        field = self._reader.get_field("general.architecture")
        try:
            return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
        except (IndexError, UnicodeDecodeError):
            return None

    def quant_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds, e.g. {"Q8_0": 304, "F32": 475}."""
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def meta(self) -> StateDict:
        """Meta tensors of the logical (dequantized) shapes, for matching against a config."""
        return {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}

    def tensors(self) -> StateDict:
        """Every tensor: F32/F16 as plain tensors, quantized (and BF16) ones as diffusers' `GGUFParameter`; quantized
        tensors that are not 2-D are dequantized to float32 (only Linear weights stay quantized)."""
        from gguf import GGMLQuantizationType as Q
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor

        out: StateDict = {}
        for key, t in self._tensors.items():
            try:
                data = torch.from_numpy(t.data)
            except Exception as e:
                raise ModelLoadError(f"{self.path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from None
            if t.tensor_type in (Q.F32, Q.F16):
                out[key] = data
                continue
            if t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_GGUF_QUANT_TYPES))
                raise ModelLoadError(f"{self.path}: tensor {t.name} has GGML type {t.tensor_type.name}, which "
                                     f"diffusers cannot dequantize (supported: F32, F16, {supported})")
            param = GGUFParameter(data, quant_type=t.tensor_type)
            out[key] = param if len(self.shapes[key]) == 2 else dequantize_gguf_tensor(param).float()
        return out


def detect_layout(file: GGUFFile) -> GGUFLayout:
    """The FLUX layout of the file's keys; anything else is a ModelLoadError naming what the file holds."""
    keys = file.keys
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    arch = file.architecture()
    held = f"a {arch!r} model (general.architecture)" if arch and arch != "flux" else "no FLUX transformer"
    sample = ", ".join(sorted(keys)[:5]) or "none"
    raise ModelLoadError(
        f"{file.path}: holds {held}; only FLUX.1 transformer GGUF files are supported (BFL keys double_blocks.*, "
        f"single_blocks.*, img_in.*, or diffusers keys transformer_blocks.*, single_transformer_blocks.*, "
        f"x_embedder.*); first keys in the file: {sample}"
    )


def choose_config(file: GGUFFile, layout: GGUFLayout, candidates: Iterable[Path]) -> Path:
    """The first candidate folder whose FLUX transformer config has exactly the file's keys and logical shapes."""
    converted = layout.to_diffusers(file.meta())
    reasons = []
    for folder in candidates:
        folder = Path(folder)
        try:
            if (family := folder_family(folder).name) != "flux":
                reason = f"a {family} folder, not flux"
            else:
                reason = _shape_mismatch(build_meta_component(folder, COMPONENT), converted)
        except Exception as e:  # a folder without a transformer config, an unknown class
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return folder
        reasons.append(f"  {folder}: {reason}")
        log.debug("gguf %s: skipping candidate %s (%s)", file.path, folder, reason)
    tried = "\n".join(reasons) or "  (no candidate folders)"
    raise ModelLoadError(
        f"{file.path}: no flux architecture config matches the GGUF transformer's shapes; tried:\n{tried}\n"
        "pass config=<registry id or diffusers-layout folder> of the same architecture"
    )


def load_gguf_transformer(file: GGUFFile, layout: GGUFLayout, folder: Path, torch_dtype: TorchDtype) -> Any:
    """The transformer from the file on `folder`'s config, quantized weights as stored, compute in the policy's
    dtype for it. `choose_config` has checked keys and shapes, so diffusers converts nothing."""
    from diffusers import GGUFQuantizationConfig

    from .single_file import _component_class

    library, cls = _component_class(folder, COMPONENT)
    dtype = component_dtype(torch_dtype, COMPONENT, cls.__name__, folder_config(folder / COMPONENT))
    if load_quantization(torch_dtype, COMPONENT, library, cls.__name__) is not None:
        log.info("gguf %s: the file's own quantization is used; the policy's %s quantization is ignored",
                 file.path, COMPONENT)
    if not hasattr(cls, "from_single_file"):
        raise ModelLoadError(f"{folder}: {library}.{cls.__name__} cannot load a single file")
    state = layout.to_diffusers(file.tensors())
    try:
        model = cls.from_single_file(state, config=str(folder), subfolder=COMPONENT, torch_dtype=dtype,
                                     quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                     local_files_only=True)
    except Exception as e:  # shapes were checked, so this is a corrupted file or an unsupported quant type
        raise ModelLoadError(f"{file.path}: cannot load the GGUF transformer ({type(e).__name__}: {e})") from None
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ModelLoadError(f"{file.path}: tensors left on the meta device after loading: {on_meta[:5]}")
    model.eval()
    model.requires_grad_(False)
    return model


def load_gguf(path: str | Path, *, candidates: Sequence[Path] | None = None, allow_pickle: bool = False,
              torch_dtype: TorchDtype = torch.float32) -> tuple[str, dict[str, Any]]:
    """Load a FLUX transformer GGUF file with the rest of its pipeline: ("flux", {component name: object}).

    `candidates`: diffusers-layout folders to match the transformer against (None: the registry's FLUX configs,
    then the tiny ones). `allow_pickle` only concerns the other components (GGUF is not pickle).
    """
    file = GGUFFile(path)
    layout = detect_layout(file)
    family = get_family("flux")
    folder = choose_config(file, layout, arch_candidates(family.name) if candidates is None else candidates)
    log.info("gguf %s: layout %s, tensors %s, config %s", file.path, layout.name, file.quant_types(), folder)
    rest = [n for n in family.components if n != COMPONENT]  # first: a missing tokenizer should fail fast
    components = load_missing_components(folder, rest, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    components[COMPONENT] = load_gguf_transformer(file, layout, folder, torch_dtype)
    return family.name, {n: components[n] for n in family.components}
