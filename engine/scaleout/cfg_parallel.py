"""CFG-parallel for UNets: one replica process that sees two devices runs each UNet call's batch in two halves, one
per device, at the same time.

Why a forward hook pair on the pipeline's own UNet (not a wrapper module): diffusers' pipelines, the LoRA loaders, the
IP-Adapter loader and the compiler passes all reach the UNet as a component (`unet.config`, `dtype`, attention
processors, `load_lora_adapter`, PEFT layers); they keep doing so unchanged. The pre-hook splits the call's batch
along dim 0 (diffusers builds `[uncond, cond]` when guidance is on, so with CFG each device gets one branch), hands
the second half to a copy of the UNet on the second device from a worker thread, and lets the UNet itself run the
first half; the post-hook waits for the copy and concatenates both outputs on the first device. A batch that does not
halve (guidance off, one image) runs unsplit on the first device.

Every argument is split by one rule: a tensor whose dim 0 is the batch size is halved (latents, timesteps per sample,
`encoder_hidden_states`, SDXL's `added_cond_kwargs` text_embeds/time_ids, IP-Adapter `image_embeds`, ControlNet
`down_block_additional_residuals` / `mid_block_additional_residual`), lists, tuples and dicts are split item by item,
and anything else (0-d timesteps, scales, None) goes to both halves as it is.

Keeping the copy in sync: the engine changes the UNet between jobs (LoRA sets loaded, hot-swapped, fused, unfused)
and inside a job (an IP-Adapter is loaded for that job only: new attention processors and `encoder_hid_proj`). The
copy records what it was built from: the adapter state the engine notes after applying a request's LoRAs
(`adapters_key`) and the UNet's `encoder_hid_proj` object. When the adapter state differs on a call, the copy is
rebuilt from the UNet (a deep copy of the module with its tensors written straight to the second device, so adapters,
processors and scales come along, and regionally compiled blocks compiled again): one UNet copy over the
interconnect per LoRA-set change; a stable set costs nothing. While `encoder_hid_proj` is not the one the copy was
built with (an IP-Adapter job), calls run unsplit on the first device and nothing is copied: mirroring a per-job
IP-Adapter would cost two whole-UNet copies per IP-Adapter job (one with it, one without for the next plain job).

Out of memory on the second device (a larger request than the plan was sized for, another process on that GPU): the
call's second half runs on the first device instead, the copy is dropped, and from then on the UNet runs unsplit on
the first device (reported through `on_fallback`). The job finishes with the same numbers; the engine's own
out-of-memory ladder, which shrinks the first device's plan, is not involved.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..runtime.planner import is_out_of_memory

log = logging.getLogger(__name__)


@dataclass
class CfgParallelStats:
    split_calls: int = 0  # UNet calls whose batch ran in two halves
    unsplit_calls: int = 0  # odd batches (or after a fallback), run on the first device alone
    rebuilds: int = 0  # copies of the UNet made for the second device (the first at attach)
    fallbacks: int = 0  # second halves run on the first device after the second ran out of memory
    replica_threads: frozenset[int] = frozenset()  # threads the copy ran in (tests: not the caller's)


def split_batch(value: Any, batch: int) -> tuple[Any, Any]:
    """(first half, second half) of a UNet argument: tensors whose dim 0 is `batch` are halved, containers item by
    item, everything else is passed to both halves."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            half = batch // 2
            return value[:half], value[half:]
        return value, value
    if isinstance(value, dict):
        pairs = {k: split_batch(v, batch) for k, v in value.items()}
        return ({k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()})
    if isinstance(value, (list, tuple)):
        pairs = [split_batch(v, batch) for v in value]
        return type(value)(p[0] for p in pairs), type(value)(p[1] for p in pairs)
    return value, value


def move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    return value


def merge_outputs(first: Any, second: Any) -> Any:
    """The UNet's output for the whole batch: `(sample,)` with return_dict=False, else its output dataclass."""
    def cat(a: Any, b: Any) -> Any:
        return torch.cat([a, b.to(a.device)]) if isinstance(a, torch.Tensor) else a

    if isinstance(first, tuple):
        return tuple(cat(a, b) for a, b in zip(first, second))
    if isinstance(first, torch.Tensor):
        return cat(first, second)
    return type(first)(**{k: cat(v, second[k]) for k, v in first.items()})


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class CfgParallel:
    """The hook pair on `unet` and its copy on `devices[1]`. `compile_kwargs`: the copy's regionally compiled blocks
    are compiled again with these (a compiled function stays bound to the module it was compiled from)."""

    def __init__(self, unet: torch.nn.Module, devices: tuple[torch.device, torch.device], *,
                 compile_kwargs: dict[str, Any] | None = None, on_fallback: Callable[[str], None] | None = None):
        self.unet = unet
        self.devices = devices
        self.compile_kwargs = compile_kwargs
        self.on_fallback = on_fallback
        self.disabled: str | None = None  # why the UNet now runs unsplit (the second device ran out of memory)
        self.adapters_key: Any = None  # set by the engine after it applies a request's LoRAs
        self.replica: torch.nn.Module | None = None
        self.stats = CfgParallelStats()
        self._built_from: tuple[Any, Any] | None = None
        self._names = [n for n in inspect.signature(type(unet).forward).parameters if n != "self"]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfg-parallel")
        self._pending: Future | None = None
        self._pending_call: dict[str, Any] | None = None  # the pending second half, on the first device
        self._handles: list[Any] = []
        self.rebuild()
        self._attach()

    # -- hooks ------------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        self._handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.unet.register_forward_hook(self._after, with_kwargs=True)]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def _detached(self) -> Iterator[None]:
        attached = bool(self._handles)
        self._detach()
        try:
            yield
        finally:
            if attached:
                self._attach()

    def remove(self) -> None:
        """Take the hooks off and drop the copy: the UNet runs alone again."""
        self._wait_pending()
        self._detach()
        self.replica = None
        self._executor.shutdown(wait=True)

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._wait_pending()  # a previous call that raised before its post-hook
        call = {**dict(zip(self._names, args)), **kwargs}
        sample = call.get("sample")
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.ndim else 0
        if batch < 2 or batch % 2 or self.disabled:
            self.stats.unsplit_calls += 1
            return None
        if self._built_from is not None and self._fingerprint()[1] is not self._built_from[1]:
            self.stats.unsplit_calls += 1  # a per-job IP-Adapter: the copy does not have it, and is not rebuilt
            return None
        if self._built_from is None or self._fingerprint() != self._built_from:
            self.rebuild()
        first, second = {}, {}
        for name, value in call.items():
            first[name], second[name] = split_batch(value, batch)
        self._pending = self._executor.submit(self._run_replica, second, _ThreadModes.of_caller(self.devices[0]))
        self._pending_call = second
        self.stats.split_calls += 1
        return (), first

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        pending, self._pending = self._pending, None
        call, self._pending_call = self._pending_call, None
        if pending is None:
            return None
        failure = None
        try:
            rest = pending.result()
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here; the rest is re-raised
            if not is_out_of_memory(e):
                raise
            failure = (str(e).splitlines() or [type(e).__name__])[0]
        # outside the except block: the error's traceback (the copy's frames and activations) is released by now
        if failure is None:
            return merge_outputs(output, rest)
        del pending
        return merge_outputs(output, self._second_half_here(module, call, failure))

    def _second_half_here(self, module: torch.nn.Module, call: dict[str, Any] | None, failure: str) -> Any:
        """The second device ran out of memory: drop the copy, run this half on the first device, stay unsplit."""
        self.disabled = (f"out of memory on {self.devices[1]} ({failure}); the UNet runs unsplit on "
                         f"{self.devices[0]} from now on")
        self.replica, self._built_from = None, None
        self.stats.fallbacks += 1
        gc.collect()
        if self.devices[1].type == "cuda":  # the copy's memory back to the device, not kept in this process's cache
            with torch.cuda.device(self.devices[1]):
                torch.cuda.empty_cache()
        log.warning("CFG-parallel: %s", self.disabled)
        if self.on_fallback is not None:
            self.on_fallback(self.disabled)
        assert call is not None
        with self._detached():
            return module(**call)

    def _run_replica(self, call: dict[str, Any], modes: "_ThreadModes") -> Any:
        """In the worker thread, under the caller's grad, inference and autocast modes (each is per thread)."""
        device = self.devices[1]
        self.stats.replica_threads = self.stats.replica_threads | {threading.get_ident()}
        scope = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with scope, modes.enter(device):
            assert self.replica is not None
            return self.replica(**move(call, device))

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        self._pending_call = None
        if pending is not None:
            with contextlib.suppress(Exception):  # the call it belonged to already failed on the first device
                pending.result()

    # -- the copy ---------------------------------------------------------------------------------------------------
    def _fingerprint(self) -> tuple[Any, Any]:
        return (self.adapters_key, getattr(self.unet, "encoder_hid_proj", None))

    def rebuild(self) -> None:
        """A fresh copy of the UNet as it is now, on the second device (tensors written there directly, never a
        second full copy on the first device)."""
        self._wait_pending()
        fingerprint = self._fingerprint()
        self.replica = None  # the old copy's memory goes before the new one is made
        device = self.devices[1]
        memo: dict[int, Any] = {}
        for tensor in list(self.unet.parameters()) + list(self.unet.buffers()):
            moved = tensor.detach().to(device, copy=True)
            if isinstance(tensor, torch.nn.Parameter):
                moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = moved
        with self._detached():
            replica = copy.deepcopy(self.unet, memo)
        _move_loose_tensors(replica, device)
        if self.compile_kwargs is not None:
            for sub in replica.modules():
                if getattr(sub, "_compiled_call_impl", None) is not None:
                    sub._compiled_call_impl = None
                    sub.compile(**self.compile_kwargs)
        self.replica = replica.eval()
        self._built_from = fingerprint
        self.stats.rebuilds += 1


@dataclass(frozen=True)
class _ThreadModes:
    """The thread-local modes a UNet call runs under, carried from the caller's thread to the worker's."""

    grad: bool
    inference: bool
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def of_caller(cls, device: torch.device) -> "_ThreadModes":
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                   torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    @contextlib.contextmanager
    def enter(self, device: torch.device) -> Iterator[None]:
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad), \
                torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast):
            yield


def _move_loose_tensors(model: torch.nn.Module, device: torch.device) -> None:
    """Tensors a module holds outside its parameters and buffers (PEFT keeps hot-swappable LoRA scales as tensors in
    a `scaling` dict) follow the copy to its device."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                if not _same_device(value.device, device):
                    setattr(module, name, value.to(device))
            elif isinstance(value, dict) and value and all(isinstance(v, (torch.Tensor, float, int))
                                                          for v in value.values()):
                for key, v in list(value.items()):
                    if isinstance(v, torch.Tensor) and not _same_device(v.device, device):
                        value[key] = v.to(device)


def attach_cfg_parallel(unet: torch.nn.Module, devices: tuple[torch.device, torch.device], *,
                        compile_kwargs: dict[str, Any] | None = None,
                        on_fallback: Callable[[str], None] | None = None) -> CfgParallel:
    """Hook CFG-parallel onto `unet` (which stays on `devices[0]`); returns the handle (stats, `remove()`).
    `on_fallback(reason)` is told when the second device runs out of memory and the UNet goes unsplit."""
    return CfgParallel(unet, devices, compile_kwargs=compile_kwargs, on_fallback=on_fallback)
