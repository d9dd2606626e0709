"""Fused RMSNorm + interleaved RoPE for the DiT self-attention's q and k, in Triton
(and the same RMSNorm without the rotation, `rms_norm`, for the cross-attention's q).

`norm_rope(y, weight, freqs, eps, heads)` computes, for y = the q (or k)
linear output [B, L, C] with C = heads * 128, what `turbo_core.models.dit` does
in two steps:

    apply_rope(RMSNorm(y).view(B, L, heads, 128), freqs)

  a. RMSNorm over the FULL last dim C (all heads together), in fp32:
     z = (y * rstd) * weight, rstd = 1 / sqrt(sum(y^2) / C + eps), fp32 weight;
     z is ROUNDED TO y's dtype (rounding point 1: the module returns y.dtype,
     and apply_rope reads that);
  b. each head's 128 channels as 64 complex numbers z[2i] + i z[2i+1], times
     freqs[l, i] = cos + i sin in fp32 (the same for every batch row and head),
     ROUNDED TO y's dtype (rounding point 2).

Both rounding points are kept, so the result equals the torch path up to the
order of the fp32 sum of squares (a different order can flip the rounding of
z by one ulp on a few elements in bf16/fp16; fp32 agrees to ~1e-7 relative).

Why: the torch path makes several passes over [L, C] (y.float(), the norm, the
cast, x.float(), the complex product, its cast) and fp32 / complex64
temporaries; at 14B-720p (L = 75600, C = 5120) each fp32 [L, C] temporary is
1.5 GiB, for q and for k. Here y is read once, the output written once, and
nothing else of that size exists.

Layout: one program per token row (b, l), held as one [HB, 128] tile (HB =
heads rounded up to a power of two, padded heads masked), so loads and stores
are contiguous and vectorised; reshaping the tile to [HB, 64, 2] and splitting
the last axis gives the real / imaginary halves without strided access. On an
H100 it takes ~1.1x the time of a plain copy of y (see `_num_warps`), ~10x
less than the torch path in bf16 (2.5x in fp32).
y is read through its batch and token strides (a slice of a larger tensor, or
the q part of a fused qkv output, needs no copy); its last dim must have unit
stride (otherwise it is copied). The output is contiguous [B, L, heads, 128].
Row offsets are int64 (B * L * C can exceed 2^31).

Interpreter (TRITON_INTERPRET=1, the CPU tests): its fp32->bf16 cast truncates,
so both rounding points go through `sla_triton._cast` (round to nearest even).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sla_triton import INTERPRET, _cast

HEAD_DIM = 128
MAX_HEADS = 64  # the row tile is [next_pow2(heads), 128] in registers


# y's strides specialised: divisible by 16, its loads are 16-byte vectors
@triton.jit(do_not_specialize=["L"])
def _norm_rope_kernel(Y, W, F, O, L, syb, syl, eps,
                      H: tl.constexpr, HB: tl.constexpr, INTERPRET: tl.constexpr, ROPE: tl.constexpr = True):
    r = tl.program_id(0).to(tl.int64)  # token row b * L + l; int64: r * C can pass 2^31
    b = r // L
    l = r - b * L
    hh = tl.arange(0, HB)
    dd = tl.arange(0, 128)
    ii = tl.arange(0, 64)
    cols = hh[:, None] * 128 + dd[None, :]  # channel index in [0, C), [HB, 128]
    mask = cols < H * 128  # padded heads (HB > H) are masked
    y = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0)
    ss = tl.sum(tl.sum(y * y, 1), 0)
    # correctly rounded sqrt and divide (torch's CPU rsqrt is 1/sqrt); one per row, so free
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(ss / (H * 128) + eps))
    # rounding point 1: RMSNorm returns y's dtype and apply_rope starts from that
    z = _cast((y * rstd) * w, O.dtype.element_ty, INTERPRET)
    if ROPE:
        re, im = tl.split(tl.reshape(z.to(tl.float32), [HB, 64, 2]))  # channels 2i, 2i+1 of each head
        fc = tl.load(F + l * 128 + ii * 2)[None, :]  # freqs as fp32 [L, 64, 2]: cos, sin
        fs = tl.load(F + l * 128 + ii * 2 + 1)[None, :]
        out = tl.reshape(tl.join(re * fc - im * fs, re * fs + im * fc), [HB, 128])
        z = _cast(out, O.dtype.element_ty, INTERPRET)
    tl.store(O + r * (H * 128) + cols, z, mask=mask)


def supports(y: torch.Tensor, heads: int | None = None) -> bool:
    """True when `norm_rope` can take y [B, L, C]: CUDA tensor (or the interpreter),
    bf16/fp16/fp32, C = heads * 128 (any multiple of 128 up to MAX_HEADS heads
    when heads is not given)."""
    if not (y.is_cuda or INTERPRET) or y.dim() != 3:
        return False
    if y.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    c = y.shape[-1]
    if heads is None:
        return c > 0 and c % HEAD_DIM == 0 and c // HEAD_DIM <= MAX_HEADS
    return 0 < heads <= MAX_HEADS and c == heads * HEAD_DIM


def _num_warps(heads: int) -> int:
    # H100, bf16, one row per program: 1.3B-480p (12 heads, L=32760) 82 us with
    # 2 warps (4: 93, 8: 108); 14B-720p (40 heads, L=75600) 578 us with 4 warps
    # (2: 679, 8: 610); a copy of y takes 71 / 514 us. Several rows per program
    # (reusing the weight tile) measured no faster.
    return 2 if triton.next_power_of_2(heads) <= 16 else 4


def norm_rope(y: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float,
              heads: int) -> torch.Tensor:
    """RMSNorm over C then interleaved RoPE per 128-channel head.

    y [B, L, C] (bf16/fp16/fp32, C = heads * 128), weight fp32 [C], freqs
    complex64 [L, 64] (or its fp32 view_as_real [L, 64, 2]). Returns
    [B, L, heads, 128] contiguous in y.dtype, equal to
    apply_rope(RMSNorm(y).view(B, L, heads, 128), freqs).
    """
    if y.dim() != 3:
        raise ValueError(f"norm_rope: y must be [B, L, C], got shape {tuple(y.shape)}")
    b, n, c = y.shape
    if heads <= 0 or c % heads != 0:
        raise ValueError(f"norm_rope: last dim {c} is not a multiple of heads={heads}")
    if c // heads != HEAD_DIM:
        raise ValueError(f"norm_rope: head dim must be {HEAD_DIM}, got {c // heads} (C={c}, heads={heads})")
    if heads > MAX_HEADS:
        raise ValueError(f"norm_rope: at most {MAX_HEADS} heads, got {heads}")
    if y.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"norm_rope: unsupported dtype {y.dtype}")
    if weight.shape != (c,):
        raise ValueError(f"norm_rope: weight must be [{c}], got {tuple(weight.shape)}")
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs.to(torch.complex64))  # [L, 64, 2] fp32, a view
    if freqs.shape != (n, HEAD_DIM // 2, 2):
        raise ValueError(f"norm_rope: freqs must be [L={n}, {HEAD_DIM // 2}] complex, "
                         f"got {tuple(freqs.shape)}")
    freqs = freqs.to(device=y.device, dtype=torch.float32).contiguous()
    return _launch(y, weight, freqs, eps, heads, (b, n, heads, HEAD_DIM))


def _launch(y, weight, freqs, eps, heads, out_shape):
    """One program per token row; freqs None = RMSNorm alone."""
    weight = weight.to(device=y.device, dtype=torch.float32).contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    out = torch.empty(out_shape, dtype=y.dtype, device=y.device)
    m = y.shape[0] * y.shape[1]
    if m == 0:
        return out
    _norm_rope_kernel[(m,)](
        y, weight, weight if freqs is None else freqs, out, y.shape[1], y.stride(0), y.stride(1), float(eps),
        H=heads, HB=triton.next_power_of_2(heads), INTERPRET=INTERPRET, ROPE=freqs is not None,
        num_warps=_num_warps(heads))
    return out


def rms_norm(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim C (a multiple of 128, up to MAX_HEADS * 128) alone, as the
    DiT's `RMSNorm` module computes it (the cross-attention's q): y [B, L, C] -> [B, L, C]
    contiguous in y.dtype. Same kernel and rounding as `norm_rope`, without the rotation."""
    if y.dim() != 3 or not supports(y):
        raise ValueError(f"rms_norm: y must be [B, L, C] bf16/fp16/fp32 with C a multiple of 128 "
                         f"(at most {MAX_HEADS * HEAD_DIM}), got {tuple(y.shape)} {y.dtype}")
    c = y.shape[-1]
    if weight.shape != (c,):
        raise ValueError(f"rms_norm: weight must be [{c}], got {tuple(weight.shape)}")
    return _launch(y, weight, None, eps, c // HEAD_DIM, y.shape)
