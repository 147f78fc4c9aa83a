"""AuraSR: fal's GigaGAN-style 4x upsampler (64x64 tiles in, 256x256 out), written from the architecture.

Parameter names and shapes follow fal's checkpoints (fal/AuraSR, fal/AuraSR-v2) so they load with `strict=True`;
the positional containers (`downs[i] = [blocks, [attn | None, downsample]]`, `ups[i] = [blocks, [upsample,
attn | None]]`, `net.{2i}` in the mapping network) exist only to reproduce those key names.

How it works: a mapping network turns a noise vector into a style; one linear layer turns the style into, for every
3x3 convolution, a per-input-channel scale and logits that mix that layer's bank of kernels ("adaptive kernel
choice"); the mixed kernel is scaled and demodulated as in StyleGAN2. The U-Net downsamples the 64x64 tile three
times, runs attention at the coarse levels and upsamples five times to 256x256.

Two ways to feed the styles:
- per tile (the reference behaviour): every sample has its own noise, so every sample has its own kernels and the
  convolution runs grouped over the batch;
- shared (`precompute_styles`): one noise vector per call; the modulated kernels are computed once and every
  modulated layer becomes an ordinary static convolution, which batches and uses channels-last kernels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_NOISE_SCALE = 0.001  # the generator perturbs its input by N(0, 1e-3) before anything else
BLOCKS_PER_LEVEL = 6  # fixed by the architecture, not a config key
FF_MULT = 4
DEMOD_EPS = 1e-8
NORM_EPS = 1e-12  # F.normalize's default; below float16's smallest normal, hence the fp32 fallback there


# ----------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StyleNetworkConfig:
    dim_in: int = 128
    dim_out: int = 512
    depth: int = 8
    lr_mul: float = 0.1
    dim_text_latent: int = 0


@dataclass(frozen=True)
class AuraSRConfig:
    """The generator's constructor arguments, as written in a checkpoint's config.json."""

    dim: int = 64
    image_size: int = 256
    input_image_size: int = 64
    style_network: StyleNetworkConfig = field(default_factory=StyleNetworkConfig)
    init_dim: int | None = None
    out_dim: int | None = None  # accepted for compatibility; the output always has `channels` channels
    up_dim_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    down_dim_mults: tuple[int, ...] = (4, 8, 16)
    channels: int = 3
    resnet_block_groups: int = 8  # accepted for compatibility; the blocks have no group norm
    full_attn: tuple[bool, ...] = (False, False, False, True, True)
    flash_attn: bool = True  # accepted for compatibility; both reference paths compute the same attention
    self_attn_dim_head: int = 64
    self_attn_heads: int = 8
    attn_depths: tuple[int, ...] = (2, 2, 2, 2, 4)
    mid_attn_depth: int = 4
    num_conv_kernels: int = 4
    resize_mode: str = "bilinear"  # accepted for compatibility; unused by the forward pass
    unconditional: bool = True
    skip_connect_scale: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AuraSRConfig:
        """Parse config.json; unknown keys are refused so a different architecture fails loudly, not silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown AuraSR config keys {unknown}")
        values = dict(raw)
        style = values.get("style_network") or {}
        if not isinstance(style, dict):
            raise ValueError("style_network must be a mapping")
        style_known = {f.name for f in fields(StyleNetworkConfig)}
        if set(style) - style_known:
            raise ValueError(f"unknown style_network keys {sorted(set(style) - style_known)}")
        values["style_network"] = StyleNetworkConfig(**style)
        for key in ("up_dim_mults", "down_dim_mults", "full_attn", "attn_depths"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; every key is also a constructor argument of the reference generator."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    # derived sizes -------------------------------------------------------------------------------------------

    @property
    def scale(self) -> int:
        return 2 ** (len(self.up_dim_mults) - len(self.down_dim_mults))

    @property
    def up_dims(self) -> list[int]:
        return [self.init_dim or self.dim, *(self.dim * m for m in self.up_dim_mults)]

    @property
    def down_dims(self) -> list[int]:
        init_down = self.up_dims[len(self.up_dim_mults) - len(self.down_dim_mults)]
        return [init_down, *(self.dim * m for m in self.down_dim_mults)]

    @property
    def skip_scale(self) -> float:
        return 2**-0.5 if self.skip_connect_scale is None else self.skip_connect_scale

    def validate(self) -> None:
        def power_of_two(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        if not (power_of_two(self.image_size) and power_of_two(self.input_image_size)):
            raise ValueError("image_size and input_image_size must be powers of two")
        if self.image_size != self.input_image_size * self.scale:
            raise ValueError(
                f"image_size {self.image_size} != input_image_size {self.input_image_size} x {self.scale} "
                "(2 ** (len(up_dim_mults) - len(down_dim_mults)))"
            )
        n_up = len(self.up_dim_mults)
        if len(self.full_attn) != n_up or len(self.attn_depths) != n_up:
            raise ValueError("full_attn and attn_depths need one entry per up level")
        if len(self.down_dim_mults) > n_up:
            raise ValueError("more down levels than up levels")
        up, down = self.up_dims, self.down_dims
        for level in range(len(self.down_dim_mults)):  # skip connections join equal widths
            if up[n_up - 1 - level] != down[-2 - level]:
                raise ValueError("down_dim_mults must be the last entries of up_dim_mults")
        if not self.unconditional or self.style_network.dim_text_latent:
            raise ValueError("only the unconditional (noise-styled) generator is supported")
        if self.num_conv_kernels < 1:
            raise ValueError("num_conv_kernels must be >= 1")


# ----------------------------------------------------------------------------------------------------- layers


def _normalize_channels(x: Tensor) -> Tensor:
    """L2-normalise over dim 1; float16 would flush the epsilon to zero (0/0 on a zero vector), so it runs in fp32."""
    if torch.finfo(x.dtype).tiny > NORM_EPS:
        return F.normalize(x.float(), dim=1, eps=NORM_EPS).to(x.dtype)
    return F.normalize(x, dim=1, eps=NORM_EPS)


class RMSNorm(nn.Module):
    """Channel RMS norm written as normalise x sqrt(C) x gain."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.gain = dim**0.5

    def forward(self, x: Tensor) -> Tensor:
        return _normalize_channels(x) * self.g * self.gain


class ModulatedConv2d(nn.Module):
    """A bank of `num_kernels` 3x3 kernels mixed by softmax logits, scaled per input channel, demodulated.

    A conv's style is either its codes `[B, dim_in + num_kernels]` (the modulation then runs here, per sample) or
    a precomputed kernel `[dim_out, dim_in, k, k]` from `modulated_weight` (then this is a plain convolution).
    """

    def __init__(self, dim_in: int, dim_out: int, num_kernels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.dim_in, self.dim_out, self.num_kernels = dim_in, dim_out, num_kernels
        self.padding = (kernel_size - 1) // 2
        self.weights = nn.Parameter(torch.empty(num_kernels, dim_out, dim_in, kernel_size, kernel_size))

    @property
    def code_dim(self) -> int:
        return self.dim_in + self.num_kernels

    def modulated_weight(self, codes: Tensor) -> Tensor:
        """Per-sample kernels `[B, out, in, k, k]` in fp32: the demodulation sum and its epsilon need the range."""
        scale, logits = codes.float().split([self.dim_in, self.num_kernels], dim=-1)
        mixed = torch.einsum("bn,noikl->boikl", logits.softmax(dim=-1), self.weights.float())
        mixed = mixed * (scale + 1)[:, None, :, None, None]
        inv_norm = mixed.square().sum(dim=(2, 3, 4), keepdim=True).clamp_min(DEMOD_EPS).rsqrt()
        return mixed * inv_norm

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        if style.dim() == 4:
            return self._conv(x, style)
        weight = self.modulated_weight(style).to(x.dtype)
        if weight.shape[0] == 1:  # one style for the whole batch: a single static kernel
            return self._conv(x, weight[0])
        if x.device.type == "cpu":  # oneDNN: per-sample static convs beat one grouped conv (about 10x in bf16)
            return torch.cat([self._conv(x[i : i + 1], weight[i]) for i in range(x.shape[0])])
        b, c, h, w = x.shape  # grouped over the batch: sample i only sees kernel i
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.flatten(0, 1), padding=self.padding, groups=b)
        return out.reshape(b, self.dim_out, *out.shape[-2:])

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """A static conv whose kernel follows the activations' memory format (channels-last stays channels-last)."""
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, padding=self.padding)


class ConvAct(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, num_kernels: int) -> None:
        super().__init__()
        self.proj = ModulatedConv2d(dim_in, dim_out, num_kernels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        return F.silu(self.proj(x, style))


class ResnetBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, num_kernels: int) -> None:
        super().__init__()
        self.block1 = ConvAct(dim_in, dim_out, num_kernels)
        self.block2 = ConvAct(dim_out, dim_out, num_kernels)
        self.res_conv: nn.Module = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def modulated_convs(self) -> tuple[ModulatedConv2d, ModulatedConv2d]:
        return self.block1.proj, self.block2.proj

    def forward(self, x: Tensor, style1: Tensor, style2: Tensor) -> Tensor:
        return self.block2(self.block1(x, style1), style2) + self.res_conv(x)


class LearnedScale(nn.Module):
    """Holds the checkpoint's `attend.scale`; attention uses the default 1/sqrt(d) scale, as the reference does."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(dim)
        self.attend = LearnedScale()
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (
            t.reshape(b, self.heads, -1, h * w).transpose(-1, -2)  # [b, heads, tokens, dim_head]
            for t in self.to_qkv(self.norm(x)).chunk(3, dim=1)
        )
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


def feed_forward(dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.Conv2d(dim, dim * FF_MULT, 1), nn.GELU(), nn.Conv2d(dim * FF_MULT, dim, 1))


class Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), feed_forward(dim)]) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class Upsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EqualLinear(nn.Module):
    """Linear layer with a learning-rate multiplier folded into the forward (StyleGAN's equalised lr)."""

    def __init__(self, dim_in: int, dim_out: int, lr_mul: float) -> None:
        super().__init__()
        self.lr_mul = lr_mul
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        self.bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.lr_mul, self.bias * self.lr_mul)


class StyleNetwork(nn.Module):
    """Noise -> style: normalise, then `depth` x (EqualLinear, LeakyReLU(0.2))."""

    def __init__(self, cfg: StyleNetworkConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(cfg.depth):
            layers += [EqualLinear(cfg.dim_in if i == 0 else cfg.dim_out, cfg.dim_out, cfg.lr_mul), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)

    def forward(self, noise: Tensor) -> Tensor:
        return self.net(_normalize_channels(noise))


# -------------------------------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class PrecomputedStyles:
    """Static kernels for every modulated convolution, in forward order, for one style vector."""

    weights: tuple[Tensor, ...]


class AuraSRGenerator(nn.Module):
    """`forward(lowres [B,3,64,64] in [0,1], noise [B,128]) -> [B,3,256,256]` (unclamped, like the reference)."""

    def __init__(self, config: AuraSRConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        n_kernels = config.num_conv_kernels
        up_dims, down_dims = config.up_dims, config.down_dims
        self.style_network = StyleNetwork(config.style_network)
        self.init_conv = nn.Conv2d(config.channels, down_dims[0], 7, padding=3)
        self.downs = nn.ModuleList(
            self._down_level(d_in, d_out, attn, depth)
            for d_in, d_out, attn, depth in zip(down_dims[:-1], down_dims[1:], config.full_attn, config.attn_depths)
        )
        self.ups = nn.ModuleList()
        mid = up_dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, n_kernels)
        self.mid_attn = Transformer(mid, config.self_attn_heads, config.self_attn_dim_head, config.mid_attn_depth)
        self.mid_block2 = ResnetBlock(mid, mid, n_kernels)
        up_pairs = list(zip(up_dims[:-1], up_dims[1:]))[::-1]
        for level, ((d_in, d_out), attn, depth) in enumerate(
            zip(up_pairs, config.full_attn[::-1], config.attn_depths[::-1])
        ):
            self.ups.append(self._up_level(level, d_in, d_out, attn, depth))
        self.final_res_block = ResnetBlock(config.dim, config.dim, n_kernels)
        self.final_to_rgb = nn.Conv2d(config.dim, config.channels, 1)
        convs = self.modulated_convs()
        self.style_to_conv_modulations = nn.Linear(config.style_network.dim_out, sum(c.code_dim for c in convs))
        self.reset_parameters()

    def _down_level(self, d_in: int, d_out: int, attn: bool, depth: int) -> nn.ModuleList:
        cfg = self.config
        blocks = nn.ModuleList(ResnetBlock(d_in, d_in, cfg.num_conv_kernels) for _ in range(BLOCKS_PER_LEVEL))
        transformer = Transformer(d_in, cfg.self_attn_heads, cfg.self_attn_dim_head, depth) if attn else None
        return nn.ModuleList([blocks, nn.ModuleList([transformer, nn.Conv2d(d_in, d_out, 3, stride=2, padding=1)])])

    def _up_level(self, level: int, d_in: int, d_out: int, attn: bool, depth: int) -> nn.ModuleList:
        cfg = self.config
        with_skips = level < len(cfg.down_dim_mults)  # the first levels concatenate the down path's outputs
        block_in = d_in * 2 if with_skips else d_in
        blocks = nn.ModuleList(ResnetBlock(block_in, d_in, cfg.num_conv_kernels) for _ in range(BLOCKS_PER_LEVEL))
        upsample = Upsample(cfg.up_dims[-1] if level == 0 else d_out, d_in)
        transformer = Transformer(d_in, cfg.self_attn_heads, cfg.self_attn_dim_head, depth) if attn else None
        return nn.ModuleList([blocks, nn.ModuleList([upsample, transformer])])

    # structure -----------------------------------------------------------------------------------------------

    def resnet_blocks(self) -> list[ResnetBlock]:
        """Every modulated block in the order the forward pass uses them (and the style codes are laid out)."""
        blocks: list[ResnetBlock] = [b for level in self.downs for b in level[0]]
        blocks += [self.mid_block1, self.mid_block2]
        blocks += [b for level in self.ups for b in level[0]]
        return blocks + [self.final_res_block]

    def modulated_convs(self) -> list[ModulatedConv2d]:
        return [conv for block in self.resnet_blocks() for conv in block.modulated_convs()]

    @property
    def noise_dim(self) -> int:
        return self.config.style_network.dim_in

    @property
    def tile_size(self) -> int:
        return self.config.input_image_size

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def is_channels_last(self) -> bool:
        return self.init_conv.weight.is_contiguous(memory_format=torch.channels_last)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The reference's initialisation, drawn from `generator` so a seeded build is reproducible."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            leaf = name.rsplit(".", 1)[-1]
            with torch.no_grad():
                if leaf == "weights":  # kernel banks (the scale cancels in demodulation)
                    nn.init.kaiming_normal_(p, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=generator)
                elif leaf == "g":
                    p.fill_(1.0)
                elif name.endswith("attend.scale") or (name.startswith("style_network") and leaf == "weight"):
                    p.normal_(generator=generator)
                elif name.startswith("style_network"):  # EqualLinear bias
                    p.zero_()
                elif leaf == "weight":
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
                else:  # conv / linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    weight = self.get_parameter(name[: -len("bias")] + "weight")
                    bound = 1 / math.sqrt(weight[0].numel())
                    p.uniform_(-bound, bound, generator=generator)

    def to(self, *args: Any, memory_format: torch.memory_format | None = None, **kwargs: Any) -> AuraSRGenerator:
        """`nn.Module.to`, except that a memory format applies to the 4-D weights only: the 5-D kernel banks are
        mixed into 4-D kernels per call (and those follow `is_channels_last`)."""
        module = super().to(*args, **kwargs) if args or kwargs else self
        if memory_format is not None:
            module._apply(lambda t: t.contiguous(memory_format=memory_format) if t.dim() == 4 else t)
        return module

    def compile_repeated_blocks(self, **compile_kwargs: Any) -> int:
        """Regional compile: compile each repeated block in place (`nn.Module.compile`); returns how many."""
        count = 0
        for module in self.modules():
            if isinstance(module, (ResnetBlock, Transformer)):
                module.compile(**compile_kwargs)
                count += 1
        return count

    # styles --------------------------------------------------------------------------------------------------

    def conv_codes(self, noise: Tensor | None = None, styles: Tensor | None = None) -> list[Tensor]:
        """Per-conv codes `[B, dim_in + kernels]` from noise (or from mapping-network styles)."""
        if styles is None:
            if noise is None:
                raise ValueError("need noise or styles")
            styles = self.style_network(noise.to(self.init_conv.weight.dtype))
        codes = self.style_to_conv_modulations(styles.to(self.init_conv.weight.dtype))
        return list(codes.split([c.code_dim for c in self.modulated_convs()], dim=-1))

    @torch.no_grad()
    def precompute_styles(self, noise: Tensor) -> PrecomputedStyles:
        """Static kernels for one noise vector `[1, noise_dim]`, in the model's dtype and memory format."""
        noise = noise.reshape(1, -1).to(self.init_conv.weight.device)
        fmt = torch.channels_last if self.is_channels_last else torch.contiguous_format
        dtype = self.init_conv.weight.dtype
        weights = tuple(
            conv.modulated_weight(code)[0].to(dtype).contiguous(memory_format=fmt)
            for conv, code in zip(self.modulated_convs(), self.conv_codes(noise))
        )
        return PrecomputedStyles(weights)

    # forward -------------------------------------------------------------------------------------------------

    def augment_input(
        self, lowres: Tensor, input_noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """lowres + N(0, 1e-3), clamped, in fp32; drawn like the reference's `randn_like` when not given."""
        x = lowres.float()
        if input_noise is None:
            input_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + input_noise.to(x) * INPUT_NOISE_SCALE).clamp(0, 1)

    def forward(
        self,
        lowres: Tensor,
        noise: Tensor | None = None,
        *,
        styles: Tensor | None = None,
        precomputed: PrecomputedStyles | None = None,
        input_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Upsample `lowres` by 4. Random draws, when not given, follow the reference's order (input noise, then a
        style-noise-sized draw, used only if `noise` is None), so identical seeding gives identical output and leaves
        the RNG in the same state."""
        size = self.config.input_image_size
        if lowres.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} tiles, got {tuple(lowres.shape[-2:])}")
        param = self.init_conv.weight
        draws_own = input_noise is None
        x = self.augment_input(lowres, input_noise, generator).to(param.dtype)
        if precomputed is not None:
            conv_styles: Sequence[Tensor] = precomputed.weights
        else:
            if styles is None and (noise is None or draws_own):
                # the reference draws style noise even when it is given (and discards it): same RNG stream
                drawn = torch.randn(x.shape[0], self.noise_dim, generator=generator, device=x.device)
                noise = drawn if noise is None else noise
            conv_styles = self.conv_codes(noise, styles)
        return self._unet(x, iter(conv_styles))

    def _unet(self, x: Tensor, styles: Iterator[Tensor]) -> Tensor:
        x = self.init_conv(x)
        skips: list[Tensor] = []
        for blocks, (attn, downsample) in self.downs:
            for block in blocks:
                x = block(x, next(styles), next(styles))
                skips.append(x)
            if attn is not None:
                x = attn(x)
            x = downsample(x)
        x = self.mid_block1(x, next(styles), next(styles))
        x = self.mid_attn(x)
        x = self.mid_block2(x, next(styles), next(styles))
        for blocks, (upsample, attn) in self.ups:
            x = upsample(x)
            for block in blocks:
                if skips:
                    x = torch.cat((x, skips.pop() * self.config.skip_scale), dim=1)
                x = block(x, next(styles), next(styles))
            if attn is not None:
                x = attn(x)
        x = self.final_res_block(x, next(styles), next(styles))
        return self.final_to_rgb(x)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
