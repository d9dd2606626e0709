"""Inputs and small Triton probes shared by the CPU (interpreter) and GPU kernel tests."""
import torch
import triton
import triton.language as tl

from turbo_core.kernels import w8a8_triton
from turbo_core.kernels.sla_triton import INTERPRET


def every_finite(dtype, device="cpu"):
    """Every finite value of a 16-bit float type (subnormals, the largest, both zeros), as a
    [rows, 128] tensor, zero-padded."""
    x = torch.arange(1 << 16, dtype=torch.int32, device=device).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    return torch.cat([x, x.new_zeros(-x.numel() % 128)]).view(-1, 128)


@triton.jit
def _gelu_probe_kernel(X, G, N, INTERPRET: tl.constexpr):
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    x = w8a8_triton._to_f32(tl.load(X + offs, mask=offs < N, other=0.0), INTERPRET)
    g = w8a8_triton._cast(w8a8_triton._gelu_tanh(x, INTERPRET), G.dtype.element_ty, INTERPRET)
    tl.store(G + offs, g, mask=offs < N)


def gelu_probe(x):
    """The activation quantisation's GELU step alone (`_gelu_tanh`, rounded to x's dtype)."""
    x = x.contiguous()
    g = torch.empty_like(x)
    _gelu_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x, g, x.numel(), INTERPRET=INTERPRET)
    return g
