"""Shape profiles of built engines: narrow buckets, not one profile over everything a request could ask for.

TensorRT sizes an engine's activation memory for the maximum of its optimization profile and tunes kernels for its
optimum, so a single profile over 64-4096 px and 16 rows holds memory for a batch of 16 4096-px images and is tuned
for none of the sizes actually used. NVIDIA's diffusion demo builds static image shapes by default (dynamic shapes
only when asked, capped at 1024 px, batch <= 4). The ONNX graph itself stays dynamic over the family's whole range;
only the engines built from it are narrow:

- `ProfilePolicy` (data, one per runtime in `POLICIES`) says how narrow: "static" (an engine takes one image size
  and prompt length, up to a step of the image ladder) or "dynamic" (pixel ranges from a table, narrowest first),
  how many engines one component keeps, and what a call outside every built engine gets: a new engine ("build":
  the first request at a new size pays for the build, later ones and later processes reuse it) or a typed 422
  (`OutsideProfileError`, "error").
- A `Bucket` is the (min, opt, max) of every dynamic axis; `narrow(spec, bucket)` is the spec an engine is built for;
  `BucketPlan.bucket_for(sizes)` the bucket a call's axis sizes need.
- `BucketedRunner` holds the built engines (the least recently used goes first), builds a missing one through a
  callback, and is what the stand-in module calls. Everything but the callback is pure and tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import OutsideProfileError
from .modules import Runner
from .onnx_export import Dim, ExportSpec
from .specs import SizeProfile

Bounds = tuple[int, int, int]  # (min, opt, max) of one axis


@dataclass(frozen=True)
class ProfilePolicy:
    """How narrow the engines' profiles are and what happens outside them."""

    shapes: Literal["static", "dynamic"]
    images: tuple[int, ...]  # ladder of images per request an engine takes (its batch maximum), ascending
    size_buckets: tuple[tuple[int, int], ...]  # "dynamic": pixel ranges (both sides), narrowest first
    max_engines: int  # per component; each one holds device memory for its profile maximum
    on_miss: Literal["build", "error"]
    # "static": the axes pinned to the size a request asks for (the image); the others keep the graph's range (the
    # prompt length: CLIP pads to 77 anyway, and a FLUX model's default max_sequence_length is not known here)
    static_axes: tuple[str, ...] = ("latent_height", "latent_width", "image_tokens")


# Native TensorRT: static image size (NVIDIA's default), up to 4 images per engine (8 on request), three engines per
# component at most (each engine holds its own copy of the weights on the device besides its activation memory; a
# build or load that finds no room drops the least recently used engine and retries once). The onnxruntime TensorRT
# provider takes a single dynamic profile from the same table (it builds its engines itself); the CPU and CUDA
# providers need no profile (they size memory per call).
POLICIES: dict[str, ProfilePolicy] = {
    "tensorrt": ProfilePolicy("static", images=(4, 8), size_buckets=((64, 512), (512, 1536), (1536, 2048),
                                                                      (2048, 4096)), max_engines=3, on_miss="build"),
    "onnxruntime-tensorrt": ProfilePolicy("dynamic", images=(4,), size_buckets=((64, 512), (512, 1536),
                                                                                (1536, 2048), (2048, 4096)),
                                          max_engines=1, on_miss="error"),
}

# The request field each axis comes from, for errors a caller can act on.
AXIS_FIELDS = {"batch": "num_images", "latent_height": "height", "latent_width": "width", "image_tokens": "width",
               "text_len": "max_sequence_length"}


@dataclass(frozen=True)
class Bucket:
    """The (min, opt, max) of every dynamic axis of one engine, sorted by axis name (hashable, a cache key part)."""

    axes: tuple[tuple[str, Bounds], ...]

    @classmethod
    def of(cls, bounds: dict[str, Bounds]) -> Bucket:
        return cls(tuple(sorted(bounds.items())))

    @property
    def bounds(self) -> dict[str, Bounds]:
        return dict(self.axes)

    def contains(self, sizes: dict[str, int]) -> bool:
        return all(lo <= sizes.get(name, opt) <= hi for name, (lo, opt, hi) in self.axes)

    @property
    def static(self) -> bool:
        return all(lo == hi for name, (lo, _, hi) in self.axes if name not in ("batch", "text_len"))

    def describe(self) -> str:
        return ", ".join(f"{n}={lo}" if lo == hi else f"{n}={lo}..{hi}" for n, (lo, _, hi) in self.axes)


def narrow(spec: ExportSpec, bucket: Bucket) -> ExportSpec:
    """`spec` with its dynamic axes bounded by `bucket` (what an engine is built for; the trace size is irrelevant
    there and only pulled inside the bounds)."""
    bounds = bucket.bounds

    def dim(d: Dim | int) -> Dim | int:
        if isinstance(d, int) or d.name not in bounds:
            return d
        lo, opt, hi = bounds[d.name]
        return Dim(d.name, lo, opt, hi, min(max(d.trace, lo), hi))

    inputs = tuple(dataclasses.replace(t, dims=tuple(dim(d) for d in t.dims)) for t in spec.inputs)
    return dataclasses.replace(spec, inputs=inputs)


def axis_sizes(spec: ExportSpec, values: dict[str, torch.Tensor]) -> dict[str, int]:
    """The size each dynamic axis takes in one call (the spec's `check` has verified they agree)."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        shape = tuple(values[t.name].shape)
        for size, d in zip(shape, t.dims):
            if isinstance(d, Dim):
                sizes.setdefault(d.name, int(size))
    return sizes


@dataclass(frozen=True)
class BucketPlan:
    """Which bucket a call needs, for one component under one policy."""

    policy: ProfilePolicy
    wide: dict[str, Dim]  # the exported graph's axes: every bucket lies inside them
    rows_per_image: int  # batch rows per image (2 for a denoiser under classifier-free guidance)
    sized: tuple[Bucket, ...] = ()  # "dynamic": the candidate buckets, narrowest first

    @classmethod
    def create(cls, policy: ProfilePolicy, spec: ExportSpec, rows_per_image: int,
               profile: SizeProfile | None = None,
               spec_for: Callable[[SizeProfile], ExportSpec] | None = None) -> BucketPlan:
        """A plan over `spec`'s axes; a "dynamic" policy also needs the component's spec builder and its family
        profile, to turn pixel ranges into axis bounds."""
        sized: list[Bucket] = []
        if policy.shapes == "dynamic":
            if profile is None or spec_for is None:
                raise ValueError("a dynamic profile policy needs the family profile and the component's spec builder")
            for lo, hi in policy.size_buckets:
                lo, hi = max(lo, profile.min_px), min(hi, profile.max_px)
                if lo > hi:
                    continue
                for images in policy.images:
                    sub = SizeProfile(lo, min(max(profile.opt_px, lo), hi), hi, images, profile.cfg)
                    sized.append(Bucket.of({d.name: (d.min, d.opt, d.max) for d in spec_for(sub).dims().values()}))
        return cls(policy, spec.dims(), rows_per_image, tuple(sized))

    def _batch(self, rows: int) -> Bounds | None:
        needed = math.ceil(rows / self.rows_per_image)
        wide = self.wide.get("batch")
        for images in self.policy.images:
            if images >= needed:
                hi = images * self.rows_per_image
                return (1, rows, hi if wide is None else min(hi, wide.max))
        return None

    def bucket_for(self, sizes: dict[str, int]) -> Bucket | None:
        """The narrowest bucket that takes `sizes` (axis name -> size), or None when no bucket of the policy can."""
        if any(not (d.min <= sizes.get(name, d.opt) <= d.max) for name, d in self.wide.items()):
            return None
        if self.policy.shapes == "dynamic":
            return next((b for b in self.sized if b.contains(sizes)), None)
        bounds: dict[str, Bounds] = {}
        for name, d in self.wide.items():
            size = sizes.get(name, d.opt)
            if name == "batch":
                batch = self._batch(size)
                if batch is None:
                    return None
                bounds[name] = batch
            elif name in self.policy.static_axes:
                bounds[name] = (size, size, size)
            else:
                bounds[name] = (d.min, d.opt, d.max)
        return Bucket.of(bounds)

    def outside_axis(self, sizes: dict[str, int]) -> str:
        """The first axis no bucket of the policy can take (for the error's field)."""
        for name, d in self.wide.items():
            if not d.min <= sizes.get(name, d.opt) <= d.max:
                return name
        if "batch" in sizes and self._batch(sizes["batch"]) is None:
            return "batch"
        return next((n for n in AXIS_FIELDS if n in sizes and n != "batch"
                     and not any(_inside(b, n, sizes[n]) for b in self.sized)), "batch")

    def initial(self) -> Bucket:
        """The bucket built at load: the graph's optimum (the family's native size, one image)."""
        bucket = self.bucket_for({name: d.opt for name, d in self.wide.items()})
        if bucket is None:
            raise ValueError(f"the profile policy has no bucket for the optimum shapes {self.wide}")
        return bucket


def outside_profile_error(component: str, sizes: dict[str, int], built: Iterable[Bucket], reason: str,
                          axis: str | None = None) -> OutsideProfileError:
    """The typed 422 for a call no built engine takes, naming the request field behind the first axis out of
    range (or `axis`) and listing the engines that are built."""
    built = list(built)
    if axis is None:
        axis = next((n for n in AXIS_FIELDS if n in sizes and built
                     and all(not _inside(b, n, sizes[n]) for b in built)), "batch")
    engines = "; ".join(b.describe() for b in built) or "none built"
    return OutsideProfileError(AXIS_FIELDS.get(axis, "width"),
                               f"the {component} engines take [{engines}], not "
                               f"{', '.join(f'{k}={v}' for k, v in sorted(sizes.items()))}: {reason}", engines)


def _inside(bucket: Bucket, name: str, size: int) -> bool:
    lo, _, hi = bucket.bounds.get(name, (size, size, size))
    return lo <= size <= hi


class DeviceMemoryError(RuntimeError):
    """An engine could not be loaded onto the device (its weights), or had no room to run."""


class NoExecutionContext(DeviceMemoryError):
    """An engine was loaded but no execution context could be created for it (its device memory, sized for the
    profile maximum, is not free)."""


class BucketedRunner:
    """Engines of one component, one per bucket, built on demand through `build(bucket)` and kept up to the
    policy's limit (least recently used dropped first, before the next one is built)."""

    def __init__(self, plan: BucketPlan, spec: ExportSpec, build: Callable[[Bucket], Runner], *,
                 release: Callable[[], None] = lambda: None):
        self.plan = plan
        self.spec = spec
        self._build = build
        self._release = release  # after an engine is dropped (e.g. torch.cuda.empty_cache)
        self.engines: OrderedDict[Bucket, Runner] = OrderedDict()
        self.builds = 0

    @property
    def description(self) -> str:
        first = next(iter(self.engines.values()), None)
        return first.description if first is not None else "no engine built"

    def prepare(self, bucket: Bucket) -> Runner:
        """The engine for `bucket`, built now if it is not held (dropping the oldest beyond the limit first)."""
        if bucket in self.engines:
            self.engines.move_to_end(bucket)
            return self.engines[bucket]
        while len(self.engines) >= max(1, self.plan.policy.max_engines):
            self._evict()
        try:
            runner = self._build(bucket)
        except DeviceMemoryError:
            if not self.engines:
                raise
            self._evict()  # one more engine's memory back, then one retry
            runner = self._build(bucket)
        self.builds += 1
        self.engines[bucket] = runner
        return runner

    def _evict(self) -> None:
        self.engines.popitem(last=False)
        self._release()

    def runner_for(self, sizes: dict[str, int]) -> Runner:
        for bucket in reversed(self.engines):  # most recently used first
            if bucket.contains(sizes):
                self.engines.move_to_end(bucket)
                return self.engines[bucket]
        bucket = self.plan.bucket_for(sizes)
        if bucket is None:
            raise outside_profile_error(self.spec.component, sizes, self.engines,
                                      "no bucket of the profile policy takes these shapes",
                                      axis=self.plan.outside_axis(sizes))
        if self.plan.policy.on_miss == "error":
            raise outside_profile_error(self.spec.component, sizes, self.engines,
                                      "this policy builds no engine on demand; load the model again for this size")
        return self.prepare(bucket)

    def __call__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        self.runner_for(axis_sizes(self.spec, inputs))(inputs, output)


__all__ = ["POLICIES", "Bucket", "BucketPlan", "BucketedRunner", "DeviceMemoryError", "NoExecutionContext",
           "OutsideProfileError", "ProfilePolicy", "axis_sizes", "narrow",
           "outside_profile_error"]
