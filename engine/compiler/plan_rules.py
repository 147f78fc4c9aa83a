"""Which compiler settings cannot combine with a memory plan, as data: `optimize` drops them before the passes run
and the report says which and why.

- CUDA graphs replay fixed weight addresses, and every offloading plan moves weights between host and device
  (the text-encoder swap too: the denoiser's group goes back to the host while the encoders run).
- An exported ONNX Runtime / TensorRT graph keeps its own copy of the weights on the device, so offloading the torch
  module would free nothing; offloading plans keep the denoiser in PyTorch.
- Lossy storage plans already store the weights as fp8/int8/nf4: quantizing them again in the quant pass would
  stack two roundings on the same weights.
- Fused q/k/v projections under lossy storage: an IP-Adapter job splits them back into to_q/to_k/to_v and re-fuses
  after; fp8/int8/nf4 weights do not split (torchao tensors have no split op; fp8 casting hooks sit on the fused
  layer) or re-fuse (diffusers builds the fused Linear in the storage dtype). Lossy plans of families that take
  IP-Adapters keep them separate.
- fp8 storage (diffusers layerwise casting) casts each layer's weights up and back in its pre/post-forward hooks
  with `module.to`, which builds new Parameters: dynamo graph-breaks there, so the blocks compile with breaks allowed,
  and no CUDA graph is captured (the cast weights are new tensors on every call).
- Group offload's onload hooks sit inside the regionally compiled blocks and are excluded from tracing: the blocks
  compile with graph breaks allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..families import FAMILIES
from .config import CompileConfig


def _takes_ip_adapters(plan: Any) -> bool:
    """Whether the planned model's family takes per-job IP-Adapters (unknown: assume it does)."""
    family = getattr(getattr(plan, "sizes", None), "family", None)
    return family not in FAMILIES or FAMILIES[family].ip_adapter


def _fp8_storage(plan: Any) -> bool:
    return bool(getattr(plan, "lossy", False)) and getattr(plan, "storage", "") == "fp8"


@dataclass(frozen=True)
class PlanRule:
    field: str
    conflicts: Callable[[Any], bool]  # the config field's value that cannot combine
    applies: Callable[[Any], bool]  # the memory plan it cannot combine with
    replacement: Any
    reason: str  # formatted with the plan's rung and storage


RULES: tuple[PlanRule, ...] = (
    PlanRule("cuda_graphs", lambda v: v is not False, lambda p: bool(getattr(p, "offloads", False)), False,
             "dropped: CUDA graphs replay fixed weight addresses and the {rung} memory plan moves weights"),
    PlanRule("backend", lambda v: v != "torch", lambda p: bool(getattr(p, "offloads", False)), "torch",
             "dropped: an exported graph keeps its own copy of the weights on the device, which the {rung} memory "
             "plan offloads; the denoiser stays in PyTorch"),
    PlanRule("quant", lambda v: v != "none", lambda p: bool(getattr(p, "lossy", False)), "none",
             "dropped: the {rung} memory plan already stores the weights as {storage}"),
    PlanRule("fuse_qkv", lambda v: v is True, lambda p: bool(getattr(p, "lossy", False)) and _takes_ip_adapters(p),
             False,
             "dropped: the {rung} memory plan stores q/k/v as {storage}, which IP-Adapter jobs could not split back "
             "out of a fused projection"),
    PlanRule("compile_fullgraph", lambda v: v is True, lambda p: getattr(p, "placement", "") == "group_offload", False,
             "fullgraph dropped: group offload onloads each block in a torch.compiler.disable()d hook inside the "
             "compiled blocks (a deliberate graph break, diffusers#11605)"),
    PlanRule("cuda_graphs", lambda v: v is not False, _fp8_storage, False,
             "dropped: the {rung} memory plan casts each layer's weights into new tensors on every call, which a "
             "CUDA-graph replay of fixed addresses cannot follow"),
    PlanRule("compile_fullgraph", lambda v: v is True, _fp8_storage, False,
             "fullgraph dropped: fp8 storage re-casts each layer's weights in a pre-forward hook (layerwise casting's "
             "module.to builds new Parameters), which dynamo cannot trace into one graph"),
)


def fit_config_to_plan(config: CompileConfig, plan: Any) -> tuple[CompileConfig, list[tuple[str, str]]]:
    """The config with the settings `plan` cannot combine with replaced, and (field, reason) for each."""
    if plan is None:
        return config, []
    changes: dict[str, Any] = {}
    dropped: list[tuple[str, str]] = []
    for rule in RULES:  # the first rule that drops a field gives its reason
        if rule.field not in changes and rule.conflicts(getattr(config, rule.field)) and rule.applies(plan):
            changes[rule.field] = rule.replacement
            dropped.append((rule.field, rule.reason.format(rung=getattr(plan, "rung", "?"),
                                                           storage=getattr(plan, "storage", "?"))))
    return (config.model_copy(update=changes) if changes else config), dropped
