"""W8A8 int8 linear layers as TurboWan `-quant` checkpoints store them.

Weights: int8 [out, in] with one fp32 scale per 128x128 tile.
Activations (W8A8 mode): quantized on the fly per 128 tokens x 128 channels.
Both use  scale = amax/128,  q = round_half_even(x * 128/amax) saturated to [-128, 127].

This file is the reference and the CPU path; the Triton kernels issue plugs a
fast GEMM in through `Int8Linear.kernel`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TILE = 128


def _pad_to_tiles(x: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    return F.pad(x, (0, -cols % TILE, 0, -rows % TILE))


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 scales [ceil(M/128), ceil(K/128)]).

    Out-of-range rows/columns of a partial tile count as 0, as in the CUDA kernel.
    """
    m, k = x.shape
    t = _pad_to_tiles(x.float())
    mt, kt = t.shape[0] // TILE, t.shape[1] // TILE
    tiles = t.view(mt, TILE, kt, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)  # [mt, kt]
    # Multiply by 128/amax (not divide by the scale): the kernel's formula.
    mult = (128.0 / amax)[:, None, :, None]
    q = torch.round(tiles * mult).clamp_(-128, 127).to(torch.int8)  # torch.round is half-to-even
    return q.view(mt * TILE, kt * TILE)[:m, :k].contiguous(), amax / 128.0


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """int8 [N, K] + tile scales -> weight [N, K] in `dtype`."""
    n, k = q.shape
    s = scale.float().repeat_interleave(TILE, 0)[:n].repeat_interleave(TILE, 1)[:, :k]
    return (q.float() * s).to(dtype)


def w8a8_linear_reference(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The official W8A8 math in kernel order, exact on any device.

    Per 128-wide K tile the int products are summed exactly (|sum| < 2^24 fits
    fp32), scaled by s_x*s_w in fp32 and accumulated in fp32; the result is cast
    to x's dtype and the bias is added in that dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q_x, s_x = quantize_int8(x2)
    m, k = q_x.shape
    n = q_w.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    row_tile = torch.arange(m, device=x.device) // TILE
    col_tile = torch.arange(n, device=x.device) // TILE
    for kt in range(-(-k // TILE)):
        cols = slice(kt * TILE, (kt + 1) * TILE)
        part = q_x[:, cols].float() @ q_w[:, cols].float().t()
        acc += part * (s_x[row_tile, kt][:, None] * s_w[col_tile, kt][None, :])
    y = acc.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape[:-1], n)


@torch.compiler.disable  # Triton kernels run eagerly inside compiled blocks (a graph break)
def run_eager(kernel, *args):
    return kernel(*args)


class Int8Linear(nn.Module):
    """A Linear whose weight stays int8 in memory (half the bytes of bf16).

    mode "dequant": weight tiles -> compute dtype, then F.linear (fast anywhere).
    mode "w8a8":    the exact official W8A8 arithmetic (reference, slow on CPU).
    A Triton kernel, when installed by the kernels module, replaces both on CUDA.
    """

    kernel = None  # set by turbo_core.kernels when a fast W8A8 GEMM is available

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        tiles = (-(-out_features // TILE), -(-in_features // TILE))
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(tiles, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.mode = "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "w8a8":
            kernel = type(self).kernel
            if kernel is not None and kernel.supports(x):
                return run_eager(kernel, x, self.int8_weight, self.scale, self.bias)
            return w8a8_linear_reference(x, self.int8_weight, self.scale, self.bias)
        w = dequantize_int8(self.int8_weight, self.scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
