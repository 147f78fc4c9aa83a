"""engine/kernels: each Triton kernel, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1), equals its
PyTorch reference over odd sizes, non-contiguous inputs and both layouts, in fp32 and bf16; the custom ops pass
torch.library's checks and compile inside a block without graph breaks.

The reference runs in fp64 on the same inputs (the oracle; PyTorch's own fp32 GroupNorm loses digits where a group's
variance is near zero) and is rounded to the input dtype. Tolerances: fp32 2e-5 absolute + relative (fp32
accumulation); bf16 about one bf16 rounding of the output.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel module is imported (Triton reads it then)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from engine.kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference  # noqa: E402
from engine.kernels.layer_norm_modulate import layer_norm_modulate, layer_norm_modulate_reference  # noqa: E402
from engine.kernels.rms_norm_rope import rms_norm_rope, rms_norm_rope_reference  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2)}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])


def _f64(*tensors):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in tensors]


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as contiguous, channels-last (4-D) and non-contiguous views (of both layouts)."""
    out = {"contiguous": x.contiguous()}
    if x.dim() == 4:
        out["channels_last"] = x.to(memory_format=torch.channels_last)
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] + 1, dtype=x.dtype)
        big[:, :, ::2, 1:] = x
        out["strided"] = big[:, :, ::2, 1:]
        out["strided_channels_last"] = big.to(memory_format=torch.channels_last)[:, :, ::2, 1:]
        assert out["strided_channels_last"].stride(1) == 1
    else:
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        out["strided"] = big[..., ::2]
    assert not out["strided"].is_contiguous()
    return out


GN_CASES = [  # shape, groups
    ((2, 64, 9, 7), 32),  # odd spatial sizes
    ((1, 12, 5, 3), 3),  # 4 channels per group
    ((3, 6, 1, 1), 6),  # one element per group
    ((2, 8, 17), 4),  # 3-D (N, C, L)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_silu_matches_reference(shape, groups, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w, b = torch.randn(shape[1]).to(dtype), torch.randn(shape[1]).to(dtype)
    for layout, xl in _layouts(x).items():
        for silu in (True, False):
            got = group_norm_silu(xl, w, b, groups, 1e-6, silu)
            _close(got, group_norm_silu_reference(*_f64(xl, w, b), groups, 1e-6, silu), dtype)
        if layout == "channels_last":  # the output keeps the layout the next convolution wants
            assert got.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_statistics_hold_for_a_large_mean():
    """A group whose mean dwarfs its spread: the shifted accumulation keeps the variance (fp64 oracle)."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16, 16) * 0.01 + 300.0
    w, b = torch.ones(8), torch.zeros(8)
    want = group_norm_silu_reference(x.double(), w.double(), b.double(), 4, 1e-6).float()
    for layout in (torch.contiguous_format, torch.channels_last):
        got = group_norm_silu(x.contiguous(memory_format=layout), w, b, 4, 1e-6, True)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_group_norm_without_affine_parameters_and_bad_groups():
    x = torch.randn(2, 6, 3, 5)
    _close(group_norm_silu(x, None, None, 3, 1e-5, True), group_norm_silu_reference(x.double(), None, None, 3, 1e-5),
           torch.float32)
    with pytest.raises(ValueError, match="groups"):
        group_norm_silu(x, None, None, 4, 1e-5, True)


def test_kernel_table_names_each_op_and_its_reference():
    import importlib

    from engine.kernels import KERNELS

    assert set(KERNELS) == {"group_norm_silu", "layer_norm_modulate", "rms_norm_rope"}
    for name, spec in KERNELS.items():
        module = importlib.import_module(f"engine.kernels.{name}")
        assert callable(getattr(module, spec.reference)) and hasattr(torch.ops.engine_kernels, name)


LN_CASES = [(2, 7, 48), (1, 33, 100), (3, 1, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", LN_CASES)
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_modulate_matches_reference(shape, dtype, affine):
    torch.manual_seed(2)
    bsz, _, c = shape
    x = torch.randn(shape).to(dtype)
    emb = torch.randn(bsz, 6 * c).to(dtype)  # chunks of the modulation projection: strided views
    shift, scale = emb.chunk(6, dim=1)[:2]
    w = torch.randn(c).to(dtype) if affine else None
    b = torch.randn(c).to(dtype) if affine else None
    for xl in _layouts(x).values():
        got = layer_norm_modulate(xl, scale, shift, w, b, 1e-6)
        _close(got, layer_norm_modulate_reference(*_f64(xl, scale, shift, w, b), 1e-6), dtype)


RR_CASES = [  # (B, S, H, D), rope
    ((2, 11, 3, 24), True),
    ((1, 5, 2, 128), True),  # FLUX's head dimension
    ((2, 3, 3, 15), False),  # odd head dimension: RMSNorm alone
]


def _rope(seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin laid out like diffusers' FLUX position embedding: (S, D), each frequency repeated for its pair."""
    pos = torch.arange(seq, dtype=torch.float64)[:, None]
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = (pos * freqs).repeat_interleave(2, dim=1)
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,rope", RR_CASES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_rope_matches_reference(shape, rope, dtype, weighted):
    torch.manual_seed(3)
    bsz, seq, heads, dim = shape
    # q as the attention produces it: a (B, S, H*D) projection unflattened into heads, and a strided slice of it
    proj = torch.randn(bsz, seq, 2 * heads * dim).to(dtype)
    views = {"contiguous": proj[..., : heads * dim].contiguous().unflatten(-1, (heads, dim)),
             "strided": proj[..., heads * dim:].unflatten(-1, (heads, dim))}
    assert not views["strided"].is_contiguous()
    w = torch.randn(dim).to(dtype) if weighted else None
    cos, sin = _rope(seq, dim) if rope else (None, None)
    for x in views.values():
        _close(rms_norm_rope(x, w, cos, sin, 1e-6), rms_norm_rope_reference(*_f64(x, w, cos, sin), 1e-6), dtype)


def test_rms_norm_rope_matches_diffusers_rotary_embedding():
    """The reference is diffusers' own apply_rotary_emb (FLUX layout), not a re-derivation of it."""
    from diffusers.models.embeddings import apply_rotary_emb

    torch.manual_seed(4)
    x = torch.randn(2, 9, 4, 32)
    w = torch.randn(32)
    cos, sin = _rope(9, 32)
    want = apply_rotary_emb(torch.nn.functional.rms_norm(x, (32,), w, 1e-6), (cos, sin), sequence_dim=1)
    _close(rms_norm_rope(x, w, cos, sin, 1e-6), want, torch.float32)


@pytest.mark.parametrize("op,args", [
    (torch.ops.engine_kernels.group_norm_silu.default,
     lambda: (torch.randn(2, 8, 3, 5), torch.randn(8), torch.randn(8), 4, 1e-6, True)),
    (torch.ops.engine_kernels.layer_norm_modulate.default,
     lambda: (torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 16), None, None, 1e-6)),
    (torch.ops.engine_kernels.rms_norm_rope.default,
     lambda: (torch.randn(1, 4, 2, 8), torch.randn(8), *_rope(4, 8), 1e-6)),
])
def test_custom_ops_pass_torch_library_checks(op, args):
    """Schema, fake (meta) implementation and the torch.compile paths agree with the real kernel."""
    torch.library.opcheck(op, args(), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


AOT_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import group_norm_silu as g, layer_norm_modulate as l, rms_norm_rope as r

arch, half = int(sys.argv[1]), sys.argv[2]
h, f = "*" + half, "*fp32"
KERNELS = [  # kernel, pointer types (other runtime arguments are i32, eps fp32), constexprs as the ops launch them
    (g._group_stats_kernel, {"x_ptr": h, "pivot_ptr": f, "part_ptr": f}, {"R": 1, "BLOCK": 1024}),
    (g._group_apply_kernel, {"x_ptr": h, "y_ptr": h, "w_ptr": h, "b_ptr": h, "mean_ptr": f, "rstd_ptr": f},
     {"R": 1, "BLOCK": 1024, "SILU": True}),
    (g._cl_stats_kernel, {"x_ptr": h, "pivot_ptr": f, "part_ptr": f}, {"PIX": 8, "BLOCK_C": 512}),
    (g._cl_apply_kernel, {"x_ptr": h, "y_ptr": h, "a_ptr": f, "b_ptr": f}, {"PIX": 8, "BLOCK_C": 512, "SILU": True}),
    (l._layer_norm_modulate_kernel, {"x_ptr": h, "y_ptr": h, "scale_ptr": h, "shift_ptr": h, "w_ptr": h, "b_ptr": h,
                                     "eps": "fp32"},
     {"ROWS": 1, "BLOCK_C": 4096, "HAS_WEIGHT": True, "HAS_BIAS": True}),
    (r._rms_norm_rope_kernel, {"x_ptr": h, "y_ptr": h, "w_ptr": h, "cos_ptr": f, "sin_ptr": f, "eps": "fp32"},
     {"ROWS": 32, "BLOCK_D": 128, "HAS_WEIGHT": True, "ROPE": True}),
]
for fn, types, consts in KERNELS:
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert ".entry" in compiled.asm["ptx"] and compiled.asm.get("cubin"), fn.fn.__name__
print("compiled", len(KERNELS))
'''


@pytest.mark.parametrize("arch,half", [(90, "bf16"), (80, "bf16"), (75, "fp16")])
def test_kernels_compile_for_cuda_without_a_gpu(arch, half):
    """The interpreter does not lower the kernels; Triton's compiler does, ahead of time for a GPU target (PTX and
    ptxas' cubin, both bundled with triton), so a kernel that only the interpreter accepts fails here."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(arch), half], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "compiled 6" in out.stdout, out.stderr[-3000:]
