"""GroupNorm (+ SiLU) as one Triton kernel pair, for the UNet's and the VAE's ResNet blocks.

PyTorch runs GroupNorm and SiLU as two kernels (two reads and two writes of the activation); here a statistics
kernel reads the activation once and an apply kernel reads it once more and writes the activated output once. The
kernels address the tensor through its strides, in the order of its memory layout, so neither layout is copied:
NCHW walks each group's contiguous run (per chunk of a group, so that a few large groups still fill the GPU);
channels-last walks tiles of pixels with every channel (coalesced along C), sums per channel and lets the host fold
channels into groups, and applies a per-(sample, channel) scale and shift. Statistics are accumulated in fp32,
shifted by the group's first element (no cancellation when a group's mean is large against its spread).

`group_norm_silu(x, weight, bias, num_groups, eps, silu)` is the custom op (`torch.ops.engine_kernels`);
`group_norm_silu_reference` is what it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import check_device, interpreting


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              num_groups: int, eps: float, silu: bool = True) -> torch.Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


@triton.jit
def _group_stats_kernel(x_ptr, pivot_ptr, part_ptr, N_GROUPS, G, CG, W, HW, GROUP_SIZE, CHUNK, NCHUNK,
                        s_n, s_c, s_h, s_w,
                        R: tl.constexpr, BLOCK: tl.constexpr):
    ng = tl.program_id(0) * R + tl.arange(0, R)  # R groups per program: n * G + g
    chunk = tl.program_id(1)
    gmask = ng < N_GROUPS
    n = ng // G
    g = ng % G
    pivot = tl.load(pivot_ptr + ng, mask=gmask, other=0.0).to(tl.float32)
    acc = tl.zeros([R, BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([R, BLOCK], dtype=tl.float32)
    start = chunk * CHUNK
    for off in range(0, CHUNK, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        mask = gmask[:, None] & (i < GROUP_SIZE)[None, :]
        c = i // HW
        s = i % HW
        ptr = x_ptr + (n * s_n + g * CG * s_c)[:, None] + (c * s_c + (s // W) * s_h + (s % W) * s_w)[None, :]
        v = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) - pivot[:, None]
        v = tl.where(mask, v, 0.0)
        acc += v
        acc2 += v * v
    out = part_ptr + (ng * NCHUNK + chunk) * 2
    tl.store(out, tl.sum(acc, axis=1), mask=gmask)
    tl.store(out + 1, tl.sum(acc2, axis=1), mask=gmask)


@triton.jit
def _group_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, N_GROUPS, G, CG, W, HW, GROUP_SIZE, CHUNK,
                        s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                        R: tl.constexpr, BLOCK: tl.constexpr, SILU: tl.constexpr):
    ng = tl.program_id(0) * R + tl.arange(0, R)
    chunk = tl.program_id(1)
    gmask = ng < N_GROUPS
    n = ng // G
    g = ng % G
    mean = tl.load(mean_ptr + ng, mask=gmask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + ng, mask=gmask, other=0.0)[:, None]
    start = chunk * CHUNK
    for off in range(0, CHUNK, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        mask = gmask[:, None] & (i < GROUP_SIZE)[None, :]
        c = i // HW
        s = i % HW
        ch = (g * CG)[:, None] + c[None, :]
        h = (s // W)[None, :]
        w = (s % W)[None, :]
        v = tl.load(x_ptr + (n * s_n)[:, None] + ch * s_c + h * s_h + w * s_w, mask=mask, other=0.0)
        wt = tl.load(w_ptr + ch, mask=mask, other=1.0).to(tl.float32)
        bs = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        y = (v.to(tl.float32) - mean) * rstd * wt + bs
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + (n * o_n)[:, None] + ch * o_c + h * o_h + w * o_w, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_stats_kernel(x_ptr, pivot_ptr, part_ptr, C, CG, W, HW, CHUNK, NCHUNK, s_n, s_c, s_h, s_w,
                     PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last: a program sums a run of pixels of one sample, all channels at once (coalesced along C), into
    per-channel partial sums; the host folds channels into groups."""
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    pivot = tl.load(pivot_ptr + n * (C // CG) + ch // CG, mask=cmask, other=0.0)
    acc = tl.zeros([PIX, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([PIX, BLOCK_C], dtype=tl.float32)
    for off in range(0, CHUNK, PIX):
        p = chunk * CHUNK + off + tl.arange(0, PIX)
        mask = (p < HW)[:, None] & cmask[None, :]
        ptr = x_ptr + n * s_n + ((p // W) * s_h + (p % W) * s_w)[:, None] + (ch * s_c)[None, :]
        v = tl.where(mask, tl.load(ptr, mask=mask, other=0.0).to(tl.float32) - pivot[None, :], 0.0)
        acc += v
        acc2 += v * v
    out = part_ptr + ((n * NCHUNK + chunk) * 2) * C + ch
    tl.store(out, tl.sum(acc, axis=0), mask=cmask)
    tl.store(out + C, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _cl_apply_kernel(x_ptr, y_ptr, a_ptr, b_ptr, C, W, HW, s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                     PIX: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    """Channels-last: y = x * a[n, c] + b[n, c] (+ SiLU) over a tile of pixels, in memory order."""
    n = tl.program_id(0)
    p = tl.program_id(1) * PIX + tl.arange(0, PIX)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    mask = (p < HW)[:, None] & cmask[None, :]
    a = tl.load(a_ptr + n * C + ch, mask=cmask, other=0.0)[None, :]
    b = tl.load(b_ptr + n * C + ch, mask=cmask, other=0.0)[None, :]
    pix = (p // W, p % W)
    v = tl.load(x_ptr + n * s_n + (pix[0] * s_h + pix[1] * s_w)[:, None] + (ch * s_c)[None, :], mask=mask, other=0.0)
    y = v.to(tl.float32) * a + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + n * o_n + (pix[0] * o_h + pix[1] * o_w)[:, None] + (ch * o_c)[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)


def _group_norm_channels_last(x4: torch.Tensor, o4: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                              pivot: torch.Tensor, num_groups: int, eps: float, silu: bool) -> None:
    n, c, hh, ww = x4.shape
    hw, cg = hh * ww, c // num_groups
    block_c = triton.next_power_of_2(c)
    budget = 1 << 16 if interpreting() else 1 << 12  # elements per tile
    pix = max(1, min(triton.next_power_of_2(hw), budget // block_c))
    # enough programs to fill a large GPU (about 512 over the batch); the interpreter takes a sample per program
    nchunk = 1 if interpreting() else max(1, min(triton.cdiv(hw, pix), triton.cdiv(512, n)))
    chunk = triton.cdiv(triton.cdiv(hw, nchunk), pix) * pix
    nchunk = triton.cdiv(hw, chunk)
    parts = torch.empty(n, nchunk, 2, c, device=x4.device, dtype=torch.float32)
    _cl_stats_kernel[(n, nchunk)](x4, pivot, parts, c, cg, ww, hw, chunk, nchunk, *x4.stride(), PIX=pix,
                                  BLOCK_C=block_c)
    s1, s2 = parts.sum(1).view(n, 2, num_groups, cg).sum(-1).unbind(1)  # (N, G) each
    count = cg * hw
    var = ((s2 - s1 * s1 / count) / count).clamp_min(0.0)
    rstd = torch.rsqrt(var + eps)
    mean = pivot + s1 / count
    # per (sample, channel): y = x * a + b with a = rstd * weight, b = bias - mean * a
    a = (rstd.repeat_interleave(cg, dim=1) * w.float()).contiguous()
    bb = (b.float() - mean.repeat_interleave(cg, dim=1) * a).contiguous()
    _cl_apply_kernel[(n, triton.cdiv(hw, pix))](x4, o4, a, bb, c, ww, hw, *x4.stride(), *o4.stride(), PIX=pix,
                                               BLOCK_C=block_c, SILU=silu)


def _launch_shape(n_groups: int, group_size: int) -> tuple[int, int, int, int]:
    """(R, BLOCK, CHUNK, NCHUNK): on a GPU one group per program and enough chunks per group to fill a large GPU when
    there are few groups (a batch of 2 at 32 groups is 64 groups); in the interpreter, which runs programs one by
    one in numpy, whole groups and many of them per program."""
    if interpreting():
        block = min(1 << 14, triton.next_power_of_2(group_size))
        rows = min(triton.next_power_of_2(n_groups), max(1, (1 << 16) // block))
        return rows, block, triton.cdiv(group_size, block) * block, 1
    block = min(1024, triton.next_power_of_2(group_size))
    want = max(1, min(triton.cdiv(group_size, block), triton.cdiv(1024, n_groups)))
    chunk = triton.cdiv(triton.cdiv(group_size, want), block) * block
    return 1, block, chunk, triton.cdiv(group_size, chunk)


@torch.library.custom_op("engine_kernels::group_norm_silu", mutates_args=())
def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float, silu: bool) -> torch.Tensor:
    check_device(x)
    n, c = x.shape[0], x.shape[1]
    if c % num_groups:
        raise ValueError(f"group_norm_silu: {c} channels do not split into {num_groups} groups")
    # 4-D (N, C, H, W) in either layout as is; other ranks as (N, C, L, 1), a view wherever L flattens
    x4 = x if x.dim() == 4 else x.reshape(n, c, -1, 1)
    o4 = torch.empty_like(x) if x.dim() == 4 else x.new_empty(x4.shape)
    hh, ww = x4.shape[2], x4.shape[3]
    cg = c // num_groups
    group_size = cg * hh * ww
    channels_last = x.dim() == 4 and x4.stride(1) == 1 and c > 1 and hh * ww > 1
    w = weight if weight is not None else x.new_ones(c)
    b = bias if bias is not None else x.new_zeros(c)
    pivot = x4[:, ::cg, 0, 0].float().contiguous()  # (N, G): each group's first element
    if channels_last:
        _group_norm_channels_last(x4, o4, w, b, pivot, num_groups, eps, silu)
        return o4
    ngroups = n * num_groups
    rows, block, chunk, nchunk = _launch_shape(ngroups, group_size)
    parts = torch.empty(ngroups, nchunk, 2, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(ngroups, rows), nchunk)
    _group_stats_kernel[grid](x4, pivot, parts, ngroups, num_groups, cg, ww, hh * ww, group_size, chunk, nchunk,
                              *x4.stride(), R=rows, BLOCK=block)
    s1, s2 = parts.sum(1).unbind(-1)
    var = ((s2 - s1 * s1 / group_size) / group_size).clamp_min(0.0)
    mean = (pivot.view(-1) + s1 / group_size).contiguous()
    rstd = torch.rsqrt(var + eps).contiguous()
    _group_apply_kernel[grid](x4, o4, w, b, mean, rstd, ngroups, num_groups, cg, ww, hh * ww, group_size, chunk,
                              *x4.stride(), *o4.stride(), R=rows, BLOCK=block, SILU=silu)
    return o4 if x.dim() == 4 else o4.view(x.shape)


@group_norm_silu.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    return torch.empty_like(x) if x.dim() == 4 else x.new_empty(x.shape)
