"""LayerNorm + adaLN modulation as one Triton kernel, for FLUX's AdaLayerNormZero / AdaLayerNormZeroSingle /
AdaLayerNormContinuous: `LayerNorm(x) * (1 + scale) + shift` with per-sample scale and shift.

Eagerly this is a LayerNorm kernel and three elementwise kernels over the (batch, tokens, 3072) activation; fused,
one read and one write. One program normalizes a tile of tokens (one 3072-wide FLUX token on a GPU); scale and shift
are read through their strides (they are chunks of the modulation projection, not contiguous).

`layer_norm_modulate(x, scale, shift, weight, bias, eps)` is the custom op; `layer_norm_modulate_reference` is what it
must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import check_device, rows_per_program


def layer_norm_modulate_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                  weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y * (1 + scale[:, None]) + shift[:, None]


@triton.jit
def _layer_norm_modulate_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, w_ptr, b_ptr, N_ROWS, L, C, eps,
                                s_xb, s_xl, s_xc, s_sb, s_sc, s_hb, s_hc,
                                ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # tokens: b * L + t
    b = rows // L
    t = rows % L
    offs = tl.arange(0, BLOCK_C)
    cmask = offs < C
    mask = (rows < N_ROWS)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + (b * s_xb + t * s_xl)[:, None] + offs[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=cmask, other=1.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + b[:, None] * s_sb + offs[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b[:, None] * s_hb + offs[None, :] * s_hc, mask=mask, other=0.0).to(tl.float32)
    y = y * (1.0 + scale) + shift
    tl.store(y_ptr + rows[:, None] * C + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("engine_kernels::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: (B, L, C); scale, shift: (B, C); weight, bias: (C,) or None (FLUX's norms have none)."""
    check_device(x)
    bsz, length, c = x.shape
    out = x.new_empty(x.shape)
    dummy = x  # stands in for an absent tensor: a valid pointer the kernel never reads (its flag is off)
    block_c = triton.next_power_of_2(c)
    rows = rows_per_program(block_c)
    _layer_norm_modulate_kernel[(triton.cdiv(bsz * length, rows),)](
        x, out, scale, shift, weight if weight is not None else dummy, bias if bias is not None else dummy,
        bsz * length, length, c, eps, *x.stride(), *scale.stride(), *shift.stride(),
        ROWS=rows, BLOCK_C=block_c, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=min(8, max(1, rows * block_c // 512)))  # a 3072-wide token: 8 warps, 16 elements per thread
    return out


@layer_norm_modulate.register_fake
def _(x, scale, shift, weight, bias, eps):
    return x.new_empty(x.shape)
