"""SageSLA-class attention in Triton: SLA with int8 q/k and (on sm89+) fp8 V.

Not a port of SpargeAttn's CUDA kernels; the same quantisation scheme (spec 3.3)
on top of the SLA Triton kernel (`sla_triton._sla_attn_kernel` with its
QK_INT8 / V_FP8 switches):

  * block map: SLA's (pooled in the input dtype), with upstream SageSLA's block
    sizes: BLKQ 64 x BLKK 128 on sm90 (Hopper), BLKQ 128 x BLKK 64 elsewhere
    (`default_blocks`; pass blkq/blkk to choose). On sm90 the 64-row query
    blocks run as one 4-warp program each, two per SM, so one program's softmax
    overlaps the other's MMA, and 128-key blocks halve the loop trips;
  * q: int8 per block of BLKQ rows, k: int8 per block of BLKK rows after
    subtracting the token mean of k (the same centred, dtype-rounded k the block
    map pools; softmax is invariant to it). scale = max|x|/127 + 1e-7,
    code = round half away from zero (x / scale). Codes and scales are written
    by the pooling kernel in the same pass that pools the block;
  * S = (int8 q . int8 k^T as int32) * s_q * s_k, online softmax as in SLA;
  * V (v_fp8=True): fp8 e4m3 with one scale per (batch, head, channel),
    scale = max_L |v| / 448 (upstream uses 2.25 to protect its fp16 PV
    accumulator; ours accumulates in fp32, so the full e4m3 range is used;
    max_L |v| comes from the linear branch's state pass over v when there is
    one, else from `channel_absmax`),
    stored transposed [B*H, D, L_pad] so the fp8 MMA reads it K-major (zero
    padding: its loads need no mask). P is scaled by 448 into fp8 (log2(448)
    added to the exp2 argument) and each block's P@V is accumulated in fp32
    (max_num_imprecise_acc = BLOCK_N keeps Hopper's fp8 MMA from accumulating
    across blocks in its reduced-precision accumulator);
  * V (v_fp8=False, sm80/sm86 or by request): P and V in fp16 (upstream's sm80
    kernel), accumulated in fp32; a channel whose max |v| passes fp16's 65504 is
    divided by max|v| / 65504 on load and multiplied back at the end
    (`fp16_v_scale`; for every other channel the scale is 1 and V is exact);
  * the linear branch and proj_l: exactly SLA's fused epilogue, from the bf16 q.
  * int32 QK tiles are converted to fp32 with an exact integer-add trick
    (|q.k| <= 127*127*128 < 2^22) rather than I2F (1% slower here); with one k
    scale per tile the row max is taken on the raw values, so each logit costs
    one subtract and one FMA.

Measured error on the CPU interpreter (tests/kernels/test_sagesla_triton.py;
random N(0,1) q/k/v, D=128, L in {200, 333, 608}, no proj_l; rel_l2 against
fp64 dense softmax attention restricted to the same selected blocks):
    SLA (bf16)                 ~2e-3
    int8 QK + fp16 V           1.0e-2 .. 1.3e-2   (test bound 2e-2)
    int8 QK + fp8 V, fp8 P     3.4e-2 .. 3.7e-2   (test bound 5e-2)
and against the official SLA op output (fixture sla_op, with proj_l): 1.2e-2
(fp16 V) and 2.9e-2 (fp8 V). The int8 error is the per-block scale on Gaussian
data; e4m3's 3 mantissa bits on P and V each add ~2.5% rms on random inputs,
whose attention outputs are small averages of random vectors (not measured on
real activations).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.sla_reference import BLKK, BLKQ
from . import sla_triton
from .sla_triton import (INTERPRET, _check_layout, _fp8_grid, attention_launch, block_lut, linear_state,
                         sla_forward)
from .sla_triton import supports as _sla_supports

FP8_MAX = 448.0
FP16_MAX = 65504.0


@triton.jit(do_not_specialize=["L", "H", "LP"])
def _v_fp8_kernel(V, VINV, VT, L, H, LP,
                  svb, svl, svh,
                  D: tl.constexpr, BLK: tl.constexpr, INTERPRET: tl.constexpr):
    """V [B,L,H,D] -> fp8 e4m3 V^T [B*H, D, LP] with v * (448/amax_channel); rows >= L are 0."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = bh64 // H
    h = bh64 % H
    rows = blk * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, D)
    x = tl.load(V + b * svb + h * svh + rows[:, None].to(tl.int64) * svl + offs_d[None, :],
                mask=(rows < L)[:, None], other=0.0).to(tl.float32)
    inv = tl.load(VINV + bh64 * D + offs_d)
    y = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
    if INTERPRET:
        y = _fp8_grid(y)  # the interpreter's own fp32->fp8 rounding is wrong; on-grid values convert exactly
    tl.store(VT + bh64 * D * LP + offs_d[None, :] * LP + rows[:, None], y.to(tl.float8e4nv),
             mask=(rows < LP)[:, None])


@triton.jit(do_not_specialize=["L", "H", "CH"])
def _absmax_kernel(V, PART, L, H, CH, svb, svl, svh, D: tl.constexpr, SUB: tl.constexpr):
    """max |v| over rows [c*CH, (c+1)*CH) of one (batch, head), per channel -> PART[bh, c, :]."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = bh64 // H
    h = bh64 % H
    offs_d = tl.arange(0, D)
    base = V + b * svb + h * svh
    m = tl.zeros([D], tl.float32)
    end = tl.minimum(L, (c + 1) * CH)
    for r0 in range(c * CH, end, SUB):
        rows = r0 + tl.arange(0, SUB)
        x = tl.load(base + rows[:, None].to(tl.int64) * svl + offs_d[None, :], mask=(rows < end)[:, None], other=0.0)
        m = tl.maximum(m, tl.max(tl.abs(x.to(tl.float32)), 0))
    tl.store(PART + (bh64 * tl.num_programs(0) + c) * D + offs_d, m)


def channel_absmax(v: torch.Tensor) -> torch.Tensor:
    """max over L of |v| for v [B,L,H,D] -> fp32 [B,H,D] (exact: a max of bf16 values).
    A Triton pass over row chunks: torch.aminmax over the strided L dim was measured
    at several ms for 14B-size inputs on an H100."""
    b, n, h, d = v.shape
    sub = 64
    ch = max(sub, triton.cdiv(triton.cdiv(n * b * h, 1056), sub) * sub)  # ~8 programs per SM
    nch = triton.cdiv(n, ch)
    part = torch.empty(b * h, nch, d, dtype=torch.float32, device=v.device)
    _absmax_kernel[(nch, b * h)](v, part, n, h, ch, v.stride(0), v.stride(1), v.stride(2),
                                 D=d, SUB=sub, num_warps=4)
    return part.amax(1).view(b, h, d)


def quantize_v_fp8(v: torch.Tensor, pad_to: int = 128, amax: torch.Tensor | None = None):
    """v [B,L,H,D] -> (V^T fp8 [B*H, D, L_pad], per-channel scale fp32 [B*H, D]).
    amax: `channel_absmax(v)` if already known (`linear_state(..., v_absmax=True)`)."""
    b, n, h, d = v.shape
    amax = (channel_absmax(v) if amax is None else amax).clamp_min(1e-8)
    vsc = (amax / FP8_MAX).reshape(b * h, d).contiguous()
    vinv = (FP8_MAX / amax).reshape(b * h, d).contiguous()
    lp = triton.cdiv(n, pad_to) * pad_to
    vt = torch.empty(b * h, d, lp, dtype=torch.float8_e4m3fn, device=v.device)
    blk = 64
    _v_fp8_kernel[(triton.cdiv(lp, blk), b * h)](
        v, vinv, vt, n, h, lp, v.stride(0), v.stride(1), v.stride(2),
        D=d, BLK=blk, INTERPRET=INTERPRET, num_warps=4)
    return vt, vsc


def fp16_v_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel divisor of V for the fp16 P.V, fp32 [B*H, D] from max|v| [B,H,D]: 1 (V exact)
    unless a channel's max passes fp16's range, then max / 65504."""
    return (amax.float() / FP16_MAX).clamp_min(1.0).reshape(-1, amax.shape[-1]).contiguous()


def fp8_supported(device=None) -> bool:
    """fp8 e4m3 MMA: sm89 (Ada), sm90 (Hopper) and newer. The interpreter emulates it."""
    if INTERPRET:
        return True
    if not torch.cuda.is_available():
        return False
    return sla_triton.capability(device) >= (8, 9)


def int8_supported(device=None) -> bool:
    """int8 MMA: sm80 and newer."""
    if INTERPRET:
        return True
    if not torch.cuda.is_available():
        return False
    return sla_triton.capability(device) >= (8, 0)


def default_blocks(device=None) -> tuple[int, int]:
    """(BLKQ, BLKK) of upstream SageSLA: 64 x 128 on sm90, else 128 x 64."""
    if not INTERPRET and torch.cuda.is_available() and sla_triton.capability(device) == (9, 0):
        return 64, 128
    return BLKQ, BLKK


def sagesla_forward(q, k, v, proj_l_weight=None, proj_l_bias=None, topk: float = 0.1, *,
                    blkq: int | None = None, blkk: int | None = None, v_fp8: bool | None = None, config=None):
    """SageSLA-class forward on [B,L,H,D]; returns q's dtype. v_fp8=None: fp8 V where supported
    (else fp16 V); blkq/blkk None: `default_blocks` for q's device."""
    dtype = q.dtype
    q, k, v = (_check_layout(t) for t in (q, k, v))
    if blkq is None or blkk is None:
        blkq, blkk = default_blocks(q.device if q.is_cuda else None)
    if v_fp8 is None:
        v_fp8 = fp8_supported(q.device if q.is_cuda else None)
    lut, (qc, qs, kc, ks) = block_lut(q, k, topk, blkq, blkk, quant=True)
    if dtype != torch.bfloat16:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    sage = dict(qc=qc, qs=qs, kc=kc, ks=ks)
    linear = vmax = None
    if proj_l_weight is not None:  # the linear branch's pass over v also gives V's scales
        *linear, vmax = linear_state(k, v, v_absmax=True)
    if v_fp8:
        sage["vt"], sage["vsc"] = quantize_v_fp8(v, amax=vmax)
    else:
        sage["vsc"] = fp16_v_scale(channel_absmax(v) if vmax is None else vmax)
    out = attention_launch(q, k, v, lut, proj_w=proj_l_weight, proj_b=proj_l_bias, sage=sage,
                           blkq=blkq, blkk=blkk, config=config, linear=linear)
    return out if dtype == torch.bfloat16 else out.to(dtype)


def sagesla_backend(q, k, v, proj_l_weight, proj_l_bias, topk):
    """The function registered as attention backend "sagesla"; falls back to SLA."""
    dev = q.device if q.is_cuda else None
    if not (_sla_supports(q) and int8_supported(dev)):
        from ..attention import say_once

        say_once("sagesla: int8 attention not supported here, using the SLA kernel")
        from .sla_triton import sla_backend

        return sla_backend(q, k, v, proj_l_weight, proj_l_bias, topk)
    return sagesla_forward(q, k, v, proj_l_weight, proj_l_bias, topk)


__all__ = ["sagesla_forward", "sagesla_backend", "quantize_v_fp8", "fp16_v_scale", "fp8_supported", "int8_supported",
           "default_blocks", "sla_forward"]
