"""RMSNorm + rotary position embedding on FLUX's queries and keys, as one Triton kernel.

FLUX normalizes each head of q and k (RMSNorm over the head dimension, with a learned weight) and then rotates
adjacent pairs (diffusers `apply_rotary_emb`, `use_real_unbind_dim=-1`); eagerly that is about ten kernels over
q and k (the norm, a float copy, the pair split, the stack, two products and a sum). Here one program handles a
tile of (batch, token, head) rows: it normalizes each row and each element's pair partner in registers and writes
the rotated result once. Without cos/sin it is a plain RMSNorm.

`rms_norm_rope(x, weight, cos, sin, eps)` is the custom op; `rms_norm_rope_reference` is what it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import check_device, rows_per_program


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                            sin: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: (B, S, H, D); cos, sin: (S, D) — diffusers' RMSNorm then `apply_rotary_emb(..., sequence_dim=1)`."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if cos is None:
        return y
    real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (y.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(x.dtype)


@triton.jit
def _rms_norm_rope_kernel(x_ptr, y_ptr, w_ptr, cos_ptr, sin_ptr, N_ROWS, S, H, D, eps,
                          s_xb, s_xs, s_xh, s_xd, s_cs, s_cd, s_ss, s_sd,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # ((b * S) + s) * H + h
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    base = (b * s_xb + s * s_xs + h * s_xh)[:, None]
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    rmask = (rows < N_ROWS)[:, None]
    mask = rmask & dmask[None, :]
    x = tl.load(x_ptr + base + offs[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        partner = offs + 1 - 2 * (offs % 2)  # the other element of the (real, imaginary) pair
        pmask = dmask & (partner < D)
        yp = tl.load(x_ptr + base + partner[None, :] * s_xd, mask=rmask & pmask[None, :], other=0.0).to(tl.float32)
        yp = yp * rstd
        if HAS_WEIGHT:
            yp = yp * tl.load(w_ptr + partner, mask=pmask, other=0.0).to(tl.float32)[None, :]
        rotated = tl.where((offs % 2 == 0)[None, :], -yp, yp)
        c = tl.load(cos_ptr + s[:, None] * s_cs + offs[None, :] * s_cd, mask=mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + s[:, None] * s_ss + offs[None, :] * s_sd, mask=mask, other=0.0).to(tl.float32)
        y = y * c + rotated * sn
    tl.store(y_ptr + rows[:, None] * D + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("engine_kernels::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """x: (B, S, H, D) any strides; weight: (D,) or None; cos, sin: (S, D) or both None (no rotation)."""
    check_device(x)
    bsz, seq, heads, dim = x.shape
    rope = cos is not None and sin is not None
    if rope and dim % 2:
        raise ValueError(f"rms_norm_rope: rotary embedding needs an even head dimension, got {dim}")
    out = x.new_empty(x.shape)
    dummy = x  # stands in for an absent tensor: a valid pointer the kernel never reads (its flag is off)
    c = cos if rope else dummy
    s = sin if rope else dummy
    cstr = cos.stride() if rope else (0, 0)
    sstr = sin.stride() if rope else (0, 0)
    block_d = triton.next_power_of_2(dim)
    rows = rows_per_program(block_d)
    n_rows = bsz * seq * heads
    _rms_norm_rope_kernel[(triton.cdiv(n_rows, rows),)](
        x, out, weight if weight is not None else dummy, c, s, n_rows, seq, heads, dim, eps, *x.stride(), *cstr,
        *sstr, ROWS=rows, BLOCK_D=block_d, HAS_WEIGHT=weight is not None, ROPE=rope,
        num_warps=min(8, max(1, rows * block_d // 512)))
    return out


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps):
    return x.new_empty(x.shape)
