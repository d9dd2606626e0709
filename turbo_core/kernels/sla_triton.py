"""Sparse-Linear Attention (SLA) forward in Triton.

Same math as `turbo_core.attention.sla_reference` (the oracle), spec 3.2:

  1. block map: q mean-pooled over BLKQ rows, (k - mean_L k) mean-pooled over
     BLKK rows (`_pool_kernel`), raw dot product of the pooled blocks in the
     input dtype, top floor(topk * Nk) key blocks (>= 1) per query block
     (`topk_lut`: torch.topk's selection, ties to the lower index), as a LUT in
     ascending order (order only changes fp32 rounding).
  2. linear-branch state per (batch, head): KV = phi(k)^T v [D, D] and
     Z = sum_L phi(k) [D], phi = softmax over the head dim (`_linear_kv_kernel`,
     L split into chunks whose fp32 partials torch sums), rounded to bf16 like
     the reference.
  3. `_sla_attn_kernel`: one program per (query block of BLKQ rows, or half of
     one, batch*head). It walks ONLY its selected key blocks (NBI of them per
     iteration, one online-softmax update) with an online softmax in base 2
     (1/sqrt(D) and log2(e) folded into one scale), masks the LUT tail and the
     partial last key block, casts P to bf16 before P@V and accumulates in
     fp32. On sm90 each key block is one TMA box of a 2D view of K / V (no
     per-row address math); elsewhere, vector loads. The epilogue adds the
     linear branch for the same rows: phi(q) KV / (1e-5 + phi(q).Z), then
     proj_l (o_l @ W^T + b), so q is read once and no [B,L,H,D] intermediate
     is written. Divisions are one reciprocal per row times a multiply (a
     precise fp32 divide per element cost ~10 instructions and registers).

Inputs and the output are [B, L, H, D] (read/written through strides, no
transposing copies; the head dim must be contiguous). bf16 is the kernel dtype;
fp16/fp32 inputs are scored in their own dtype (as the reference does) and
converted to bf16 for the attention, the output is returned in the input dtype.

The same attention kernel has constexpr switches for int8 q/k and fp8 V; the
SageSLA-class wrapper in `sagesla_triton.py` uses them.

Interpreter (TRITON_INTERPRET=1, the CPU tests): triton's interpreter
multiplies the raw uint16 bits of bf16 operands in `tl.dot` and truncates
fp32->bf16 casts (checked on triton 3.8). Under the constexpr INTERPRET flag the
kernels therefore upcast dot operands to fp32 (their values are bf16-exact, so
the products are the same) and round to bf16 with an explicit
round-to-nearest-even bit trick before a cast. On GPU the flag is False and the
native bf16 paths compile.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..attention.sla_reference import BLKK, BLKQ, topk_count

try:  # triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = _interpreting()


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _index(device) -> int:
    if device is None or getattr(device, "index", None) is None:
        return torch.cuda.current_device()
    return device.index


def capability(device=None) -> tuple[int, int]:
    """The CUDA GPU's compute capability, cached per device: the kernels ask on every launch,
    and torch's query costs several microseconds of CPU each time (launch-bound at 1.3B)."""
    return _device_facts(_index(device))[0]


def sm_count(device=None) -> int:
    """Streaming multiprocessors of the CUDA GPU (cached, as `capability`)."""
    return _device_facts(_index(device))[1]


# TURBO_KERNELS_AUTOTUNE=0 -> always the first (default) config, no timing on first call.
AUTOTUNE = os.environ.get("TURBO_KERNELS_AUTOTUNE", "1") != "0" and not INTERPRET

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _bf16v(x, INTERPRET: tl.constexpr):
    """fp32 -> fp32 holding the nearest bf16 value (round half to even)."""
    if INTERPRET:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        r = b.to(tl.float32, bitcast=True)
    else:
        r = x.to(tl.bfloat16).to(tl.float32)
    return r


@triton.jit
def _cast(x, ty: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ty with round to nearest even (also in the interpreter)."""
    if INTERPRET and ty == tl.bfloat16:  # on the bits: its converter also mangles subnormals
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(ty)
    return r


@triton.jit
def _to_f32(x, INTERPRET: tl.constexpr):
    """x -> fp32 (the interpreter's own bf16 widening mangles subnormals: done on the bits there)."""
    if INTERPRET and x.dtype == tl.bfloat16:
        r = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """16-bit float dot with fp32 accumulation (fp32 operands in the interpreter)."""
    if INTERPRET:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _int8_code(y):
    """fp32 y -> int8 rint(y) (half to even) saturated to [-128, 127], with full-rate ALU ops only.

    Clamping first is the same (the bounds are integers); then y + 1.5*2^23 lands on the integer
    grid (ulp 1 there: the add rounds half to even) and its bit pattern is 0x4B400000 + code, so
    the low byte is the two's-complement code. libdevice's rint and the float -> int8 convert
    are conversion instructions, slower on sm90: the GELU pass took 511 us with them, 445 us
    with this (32760 x 8960, H100, RESULTS.md session 8)."""
    r = tl.minimum(tl.maximum(y, -128.0), 127.0) + 12582912.0
    return r.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _fp8_grid(x):
    """Interpreter only: fp32 -> fp32 on the fp8 e4m3fn grid (RNE, saturating at 448).

    The interpreter's own fp32->fp8 cast rounds half up and mishandles mantissa
    carries; values already on the grid convert exactly.
    """
    b = x.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) << 20  # 3 mantissa bits, RNE
    normal = b.to(tl.float32, bitcast=True)
    sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # subnormals: multiples of 2^-9
    sub = tl.where(x < 0, -tl.abs(sub), sub)  # keep the sign of values that round to zero (-0.0)
    y = tl.where(tl.abs(x) < 0.015625, sub, normal)
    return tl.minimum(tl.maximum(y, -448.0), 448.0)


# ----------------------------------------------------------------------------- block map

@triton.jit
def _div_rn_by(x, d, INTERPRET: tl.constexpr):
    """x / d correctly rounded (IEEE), d one scalar: one division for r = 1/d, then per element
    y = x * r and two of Markstein's corrections y + r * (x - d * y) (FMAs). x * r is within
    1.5 ulp; the first correction makes it faithful, and from a faithful y and r = RN(1/d) the
    second is RN(x / d) (Markstein's theorem; no under/overflow at these magnitudes). 5
    instructions an element instead of div.rn's range checks and refinement: the SageSLA
    pooling pass 1.1-1.2x faster, bit-identical (H100, RESULTS session 17). The interpreter's
    fma rounds twice, so there numpy divides."""
    if INTERPRET:
        return tl.math.div_rn(x, tl.zeros(x.shape, tl.float32) + d)
    r = tl.math.div_rn(1.0, d)
    y = x * r
    y = tl.fma(tl.fma(-y, d, x), r, y)
    return tl.fma(tl.fma(-y, d, x), r, y)


@triton.jit(do_not_specialize=["L", "H", "NB"])
def _pool_kernel(X, MEAN, P, XQ, XS,
                 L, H, NB,
                 sxb, sxl, sxh,
                 BLK: tl.constexpr, D: tl.constexpr,
                 SUB_MEAN: tl.constexpr, QUANT: tl.constexpr, INTERPRET: tl.constexpr):
    """One block of BLK rows of one (batch, head): mean-pool (fp32 sum / real row
    count, stored in P's dtype); with SUB_MEAN the rows are first centred by
    MEAN [B*H, D] and rounded to X's dtype (the reference's `k - k.mean()`).
    QUANT also writes int8 codes [B*H, L, D] and one scale per block (SageSLA):
    scale = max|x|/127 + 1e-7, code = round half away from zero (x / scale)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = bh64 // H
    h = bh64 % H
    rows = blk * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, D)
    rmask = rows < L
    ptrs = X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + offs_d[None, :]
    x = tl.load(ptrs, mask=rmask[:, None], other=0.0).to(tl.float32)
    if SUB_MEAN:
        mu = tl.load(MEAN + bh64 * D + offs_d).to(tl.float32)
        x = _cast(x - mu[None, :], X.dtype.element_ty, INTERPRET).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)
    cnt = tl.minimum(L - blk * BLK, BLK).to(tl.float32)
    pooled = tl.math.div_rn(tl.sum(x, 0), tl.zeros([D], tl.float32) + cnt)
    tl.store(P + (bh64 * NB + blk) * D + offs_d, _cast(pooled, P.dtype.element_ty, INTERPRET))
    if QUANT:
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.math.div_rn(amax, 127.0) + 1e-7
        y = _div_rn_by(x, scale, INTERPRET)
        # floor(|y| + 0.5) with the sign of y, |y| <= 127, by adds only: rint by the 1.5*2^23 add,
        # minus one where it rounded up (floor is a conversion instruction, slower on sm90)
        t = tl.abs(y) + 0.5
        r = (t + 12582912.0) - 12582912.0
        code = tl.where(r > t, r - 1.0, r)
        qptrs = XQ + (bh64 * L + rows[:, None]) * D + offs_d[None, :]
        tl.store(qptrs, _int8_code(tl.where(y < 0, -code, code)), mask=rmask[:, None])
        tl.store(XS + bh64 * NB + blk, scale)


def _check_layout(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_blocks(x: torch.Tensor, blk: int, mean: torch.Tensor | None = None, quant: bool = False):
    """x [B,L,H,D] -> pooled [B,H,ceil(L/blk),D] in x.dtype (and, with quant,
    int8 codes [B,H,L,D] and fp32 scales [B,H,nblocks])."""
    x = _check_layout(x)
    b, n, h, d = x.shape
    nb = triton.cdiv(n, blk)
    pooled = torch.empty(b, h, nb, d, dtype=x.dtype, device=x.device)
    if quant:
        codes = torch.empty(b, h, n, d, dtype=torch.int8, device=x.device)
        scales = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    else:
        codes, scales = pooled, pooled  # unused pointers
    mean_arg = mean.contiguous() if mean is not None else pooled
    _pool_kernel[(nb, b * h)](
        x, mean_arg, pooled, codes, scales, n, h, nb,
        x.stride(0), x.stride(1), x.stride(2),
        BLK=blk, D=d, SUB_MEAN=mean is not None, QUANT=quant, INTERPRET=INTERPRET,
        num_warps=8 if blk * d >= 128 * 128 else 4)
    return (pooled, codes, scales) if quant else pooled


@triton.jit(do_not_specialize=["R", "NK", "KK"])
def _topk_lut_kernel(S, LUT, R, NK, KK, ROWS: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr):
    """ROWS rows of the block scores S [R, NK] -> the indices of each row's KK largest scores,
    ascending, int32 into LUT [R, KK]; ties at the threshold go to the lower indices. No sort:
    each score's bits (BITS = 16 for bf16 / fp16, 32 for fp32) become an order-preserving
    unsigned key (-0.0 = +0.0); the KK-th largest key is found bit by bit (a count of the keys
    at or above each candidate), and a running count gives each selected index its place."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, NP)
    m = (r < R)[:, None] & (c < NK)[None, :]
    x = tl.load(S + r[:, None] * NK + c[None, :], mask=m, other=0.0)
    if BITS == 16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        o = tl.where(b < 0, b ^ 0x7FFF, b)  # negatives: larger magnitude, smaller key
        key = (tl.where(o == -1, 0, o) + 32768).to(tl.uint32)  # -0.0 ties with +0.0
    else:
        b = x.to(tl.int32, bitcast=True)
        o = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
        key = (tl.where(o == -1, 0, o) ^ -2147483648).to(tl.uint32, bitcast=True)
    t = tl.zeros([ROWS], tl.uint32)
    for bit in tl.static_range(BITS - 1, -1, -1):
        cand = t | (1 << bit)
        t = tl.where(tl.sum(((key >= cand[:, None]) & m).to(tl.int32), 1) >= KK, cand, t)
    above = (key > t[:, None]) & m
    tie = (key == t[:, None]) & m
    need = KK - tl.sum(above.to(tl.int32), 1)  # >= 1: t is the KK-th largest key
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= need[:, None]))
    pos = tl.cumsum(sel.to(tl.int32), 1) - 1
    tl.store(LUT + r[:, None] * KK + pos, c[None, :].broadcast_to(ROWS, NP), mask=sel)


def topk_lut(scores: torch.Tensor, kk: int) -> torch.Tensor:
    """scores [..., nk] -> int32 [..., kk]: the indices of each row's kk largest scores (ties:
    lower index first), ascending -- the LUT the attention kernel reads. One Triton pass, where
    torch.topk + a sort took 90 / 795 us a layer at 1.3B-480p / 14B-720p, this 40 / 450 us (H100)."""
    nk = scores.shape[-1]
    if not 1 <= kk <= nk:
        raise ValueError(f"topk_lut: need 1 <= kk <= nk, got kk={kk}, nk={nk}")
    if scores.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"topk_lut: scores must be bf16, fp16 or fp32, not {scores.dtype}")
    s = scores.contiguous()
    lut = torch.empty(*s.shape[:-1], kk, dtype=torch.int32, device=s.device)
    r = s.numel() // nk
    if r:
        np_ = triton.next_power_of_2(nk)
        rows = 32 if INTERPRET else max(1, 2048 // np_)
        _topk_lut_kernel[(triton.cdiv(r, rows),)](s, lut, r, nk, kk, ROWS=rows, NP=np_,
                                                  BITS=8 * s.element_size(), num_warps=4)
    return lut


def block_lut(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK,
              quant: bool = False):
    """The reference's block selection on [B,L,H,D] inputs.

    Returns lut int32 [B,H,Mq,kk] (ascending key-block indices per query block)
    and, with quant, (q codes, q scales, k codes, k scales) for SageSLA.
    """
    # Same call on the same memory as the reference (identical mean on a device).
    k_mean = k.transpose(1, 2).mean(dim=-2)  # [B,H,D] in k's dtype
    if quant:
        pq, qc, qs = pool_blocks(q, blkq, quant=True)
        pk, kc, ks = pool_blocks(k, blkk, mean=k_mean, quant=True)
    else:
        pq = pool_blocks(q, blkq)
        pk = pool_blocks(k, blkk, mean=k_mean)
    scores = pq @ pk.transpose(-1, -2)  # [B,H,Mq,Nk], raw dot product in the input dtype
    lut = topk_lut(scores, topk_count(scores.shape[-1], topk))  # ascending, for the kernel
    if quant:
        return lut, (qc, qs, kc, ks)
    return lut


def lut_to_map(lut: torch.Tensor, n_kblocks: int) -> torch.Tensor:
    """LUT [B,H,Mq,kk] -> int8 sparse map [B,H,Mq,Nk] (1 = key block kept)."""
    shape = (*lut.shape[:-1], n_kblocks)
    return torch.zeros(shape, dtype=torch.int8, device=lut.device).scatter_(-1, lut.long(), 1)


# ----------------------------------------------------------------------------- linear branch state

@triton.jit(do_not_specialize=["L", "H", "NCH", "CH"])
def _linear_kv_kernel(K, V, KVP, ZP, VMP,
                      L, H, NCH, CH,
                      skb, skl, skh, svb, svl, svh,
                      D: tl.constexpr, SUB: tl.constexpr, V_ABSMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """Partial phi(k)^T v and sum phi(k) over rows [c*CH, (c+1)*CH) of one head; V_ABSMAX
    also max |v| per channel (SageSLA's fp8 V scale) from the same v tiles."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = bh64 // H
    h = bh64 % H
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, SUB)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kv = tl.zeros([D, D], tl.float32)
    z = tl.zeros([D], tl.float32)
    # max |v| elementwise in v's dtype, reduced over rows once at the end: a column max per tile
    # added as much time as channel_absmax's own pass (H100, RESULTS.md session 13)
    vm = tl.zeros([SUB, D], v_base.dtype.element_ty)
    start = c * CH
    end = tl.minimum(L, start + CH)
    for r0 in range(start, end, SUB):
        rows = r0 + offs_r
        ok = rows < end
        kx = tl.load(k_base + rows[:, None].to(tl.int64) * skl + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        e = tl.exp(kx - tl.max(kx, 1)[:, None])
        # one division per row, not per element (a precise fp32 divide is ~10 instructions)
        phi = _bf16v(e * (1.0 / tl.sum(e, 1))[:, None], INTERPRET)  # softmax in bf16, like the reference
        phi = tl.where(ok[:, None], phi, 0.0)
        vx = tl.load(v_base + rows[:, None].to(tl.int64) * svl + offs_d[None, :], mask=ok[:, None], other=0.0)
        kv += _dot(tl.trans(phi).to(tl.bfloat16), vx, INTERPRET)
        z += tl.sum(phi, 0)
        if V_ABSMAX:  # masked rows loaded as 0
            vm = tl.maximum(vm, tl.abs(vx)).to(vm.dtype)
    out = bh64 * NCH + c
    tl.store(KVP + out * D * D + offs_d[:, None] * D + offs_d[None, :], kv)
    tl.store(ZP + out * D + offs_d, z)
    if V_ABSMAX:
        tl.store(VMP + out * D + offs_d, tl.max(vm.to(tl.float32), 0))


def linear_state(k: torch.Tensor, v: torch.Tensor, chunk: int | None = None, v_absmax: bool = False):
    """k, v [B,L,H,D] bf16 -> KV bf16 [B*H, D, D] (phi(k)^T v) and Z fp32 [B*H, D]
    (sum phi(k), rounded to bf16 like the reference's bf16 sum); with v_absmax also
    max over L of |v|, fp32 [B,H,D] (exact), read from the same pass over v."""
    b, n, h, d = k.shape
    out = {}

    def launch(cfg):
        cfg = dict(cfg)
        sub = cfg.pop("SUB")
        ch = chunk
        if ch is None:
            # ~4 programs per SM on an H100 (132 SMs), whatever the shape.
            ch = max(sub, triton.cdiv(triton.cdiv(n * b * h, 528), sub) * sub)
        ch = triton.cdiv(ch, sub) * sub
        nch = triton.cdiv(n, ch)
        kvp = torch.empty(b * h, nch, d, d, dtype=torch.float32, device=k.device)
        zp = torch.empty(b * h, nch, d, dtype=torch.float32, device=k.device)
        vmp = torch.empty(b * h, nch, d, dtype=torch.float32, device=k.device) if v_absmax else zp
        _linear_kv_kernel[(nch, b * h)](
            k, v, kvp, zp, vmp, n, h, nch, ch,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            D=d, SUB=sub, V_ABSMAX=v_absmax, INTERPRET=INTERPRET, **cfg)
        out["parts"] = kvp, zp, vmp

    config = pick_config(("linear_state", n, b, h, d, chunk, v_absmax), LINEAR_CONFIGS, launch)
    launch(config)
    kvp, zp, vmp = out["parts"]
    kv = kvp.sum(1).to(torch.bfloat16).contiguous()
    z = zp.sum(1).to(torch.bfloat16).float().contiguous()
    if v_absmax:
        return kv, z, vmp.amax(1).view(b, h, d)
    return kv, z


# SUB rows per step (ptxas, sm90: 64 rows / 8 warps: 155 registers, one program
# per SM; 128 rows: 244). H100, ms at 1.3B / 14B: SUB=128 3 stages 0.167 / 1.07;
# SUB=64 2-4 stages 0.19 / 1.35-1.47 (latency-bound: ~1.4 TB/s of k and v);
# session 12 (one sweep): SUB=64 on 4 warps, 2 stages 0.145 / 0.98-0.99, against
# 0.165 / 1.10 for SUB=128 3 stages (4-16 programs per SM change little).
LINEAR_CONFIGS = [
    dict(SUB=128, num_warps=8, num_stages=3),
    dict(SUB=64, num_warps=8, num_stages=2),
    dict(SUB=64, num_warps=4, num_stages=2),
]


# ----------------------------------------------------------------------------- attention

@triton.jit
def _load_k(K, KI, kb, b, h, bh64, L, k_base, skl,
            D: tl.constexpr, BLKK: tl.constexpr, USE_TMA: tl.constexpr, QK_INT8: tl.constexpr):
    """K rows of key block kb, [BLKK, D] (bf16, or the int8 codes). TMA: a box of a 2D
    view ([B*L, H*D], or [B*H*L, D] for the codes); rows past L are masked in S."""
    rows = kb * BLKK + tl.arange(0, BLKK)
    offs_d = tl.arange(0, D)
    if QK_INT8:
        if USE_TMA:
            kx = KI.load([(bh64 * L + kb * BLKK).to(tl.int32), 0])
        else:
            kx = tl.load(KI + (bh64 * L + rows[:, None]) * D + offs_d[None, :], mask=(rows < L)[:, None], other=0)
    else:
        if USE_TMA:
            kx = K.load([(b * L + kb * BLKK).to(tl.int32), (h * D).to(tl.int32)])
        else:
            kx = tl.load(k_base + rows[:, None].to(tl.int64) * skl + offs_d[None, :], mask=(rows < L)[:, None],
                         other=0.0)
    return kx


@triton.jit
def _load_v(V, VT, kb, b, h, bh64, L, LP, v_base, svl,
            D: tl.constexpr, BLKK: tl.constexpr, USE_TMA: tl.constexpr, V_FP8: tl.constexpr):
    """V rows of key block kb: bf16 [BLKK, D], or fp8 V^T [D, BLKK] (zero past L)."""
    rows = kb * BLKK + tl.arange(0, BLKK)
    offs_d = tl.arange(0, D)
    if V_FP8:
        if USE_TMA:
            vx = VT.load([(bh64 * D).to(tl.int32), (kb * BLKK).to(tl.int32)])
        else:
            vx = tl.load(VT + bh64 * D * LP + offs_d[:, None] * LP + rows[None, :])
    else:
        if USE_TMA:
            vx = V.load([(b * L + kb * BLKK).to(tl.int32), (h * D).to(tl.int32)])
        else:
            vx = tl.load(v_base + rows[:, None].to(tl.int64) * svl + offs_d[None, :], mask=(rows < L)[:, None],
                         other=0.0)
    return vx


@triton.jit
def _qk(q, kx, QK_INT8: tl.constexpr, INTERPRET: tl.constexpr):
    """S tile in raw units: bf16 q.k in fp32; int8: M + q.k, the int32 dot with the
    magic M = 1.5*2^23 added and read as fp32 (exact for |q.k| < 2^22). Here I2F
    measured 1% slower on the H100 (the attention is exp2-bound; the W8A8 GEMM,
    which has no exp2, uses I2F)."""
    if QK_INT8:
        x = (tl.dot(q, tl.trans(kx)) + 0x4B400000).to(tl.float32, bitcast=True)
    else:
        x = _dot(q, tl.trans(kx), INTERPRET)
    return x


@triton.jit
def _logit_max(x, c, QK_INT8: tl.constexpr):
    """Row max of the base-2 logits x*c (c > 0 scalar): taken on the raw values."""
    if QK_INT8:
        r = (tl.max(x, 1) - 12582912.0) * c
    else:
        r = tl.max(x, 1) * c
    return r


@triton.jit
def _probs(x, c, m_new, P_SHIFT: tl.constexpr, QK_INT8: tl.constexpr):
    """exp2(logit - m_new + P_SHIFT); one FMA per element (plus the exact magic subtract).
    (ex2.approx.f16x2 is no faster: ptxas splits it into two MUFU.EX2 on sm90.)"""
    if QK_INT8:
        x = x - 12582912.0
    return tl.math.exp2(x * c - (m_new[:, None] - P_SHIFT))


@triton.jit
def _pv(acc, p, vx, vinv, BLKK: tl.constexpr, V_FP8: tl.constexpr, PV_F16: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + P @ V for one key block (P already scaled for fp8). PV_F16: P and V (times vinv,
    1 unless a channel passes fp16's range) in fp16, accumulated in fp32."""
    if V_FP8:
        if INTERPRET:
            acc += tl.dot(_fp8_grid(p), tl.trans(vx.to(tl.float32)))
        else:
            acc += tl.dot(p.to(tl.float8e4nv), tl.trans(vx), max_num_imprecise_acc=BLKK)
    elif PV_F16:
        v16 = (_to_f32(vx, INTERPRET) * vinv[None, :]).to(tl.float16)
        if INTERPRET:  # fp16 values, summed in fp32 (the interpreter's fp16 dot would sum in fp16)
            acc += tl.dot(p.to(tl.float16).to(tl.float32), v16.to(tl.float32))
        else:
            acc += tl.dot(p.to(tl.float16), v16)
    else:
        if INTERPRET:
            acc += tl.dot(_bf16v(p, INTERPRET), vx.to(tl.float32))
        else:
            acc += tl.dot(p.to(tl.bfloat16), vx)
    return acc


# Sizes are not specialised: one compile serves every sequence length.
@triton.jit(do_not_specialize=["L", "H", "MQ", "NK", "KK", "LP"])
def _sla_attn_kernel(
    Q, K, V, O, LUT,
    QI, KI, QSC, KSC, VT, VSC,
    KV, Z, W, BIAS,
    L, H, MQ, NK, KK, LP,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    qk_scale,
    D: tl.constexpr, BLKQ: tl.constexpr, BLKK: tl.constexpr, NBI: tl.constexpr, ROWS: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr,
    QK_INT8: tl.constexpr, V_FP8: tl.constexpr, INTERPRET: tl.constexpr, PV_F16: tl.constexpr = False,
):
    # One program: ROWS query rows (a whole query block, or half of one: same LUT row).
    SPLIT: tl.constexpr = BLKQ // ROWS
    pid = tl.program_id(0)
    pid_m = pid // SPLIT
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = bh64 // H
    h = bh64 % H
    P_SHIFT: tl.constexpr = 8.807354922057604 if V_FP8 else 0.0  # log2(448): fp8 P spans e4m3
    offs_m = pid_m * BLKQ + (pid % SPLIT) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLKK)
    m_ok = offs_m < L

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :]
    if USE_TMA:  # K/V (or the codes / V^T) are descriptors: no base pointers
        k_base = Q
        v_base = Q
    else:
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
    if QK_INT8:
        q = tl.load(QI + (bh64 * L + offs_m[:, None]) * D + offs_d[None, :], mask=m_ok[:, None], other=0)
        # q block scale with 1/sqrt(D) and log2(e) folded in
        row_scale = tl.load(QSC + bh64 * MQ + pid_m) * qk_scale
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
        row_scale = qk_scale

    vinv = 1.0
    if PV_F16:  # per-channel V scale: 1, or what brings a channel into fp16's range
        vinv = tl.math.div_rn(tl.full([D], 1.0, tl.float32), tl.load(VSC + bh64 * D + offs_d))
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    lut_row = LUT + (bh64 * MQ + pid_m) * KK
    # NBI key blocks per iteration as separate 64/128-key sub-tiles sharing one
    # online-softmax update (one acc rescale per NBI blocks). Scalar LUT reads:
    # each block is one contiguous TMA box / vector load.
    for j in range(0, KK, NBI):
        kb0 = tl.load(lut_row + j)
        x0 = _qk(q, _load_k(K, KI, kb0, b, h, bh64, L, k_base, skl, D, BLKK, USE_TMA, QK_INT8), QK_INT8, INTERPRET)
        c0 = row_scale
        if QK_INT8:
            c0 = tl.load(KSC + bh64 * NK + kb0) * row_scale
        if NBI == 2:
            kb1 = tl.load(lut_row + tl.minimum(j + 1, KK - 1))  # past the end: masked below
            x1 = _qk(q, _load_k(K, KI, kb1, b, h, bh64, L, k_base, skl, D, BLKK, USE_TMA, QK_INT8),
                     QK_INT8, INTERPRET)
            c1 = row_scale
            if QK_INT8:
                c1 = tl.load(KSC + bh64 * NK + kb1) * row_scale
        # Only the LUT tail and the partial last key block need a mask; the LUT is
        # ascending, so both can only occur in the last iteration (a scalar test).
        if j + NBI >= KK:
            x0 = tl.where((kb0 * BLKK + offs_n < L)[None, :], x0, float("-inf"))
            if NBI == 2:
                x1 = tl.where(((kb1 * BLKK + offs_n < L) & (j + 1 < KK))[None, :], x1, float("-inf"))
        m_new = tl.maximum(m_i, _logit_max(x0, c0, QK_INT8))
        if NBI == 2:
            m_new = tl.maximum(m_new, _logit_max(x1, c1, QK_INT8))
        p0 = _probs(x0, c0, m_new, P_SHIFT, QK_INT8)
        l_add = tl.sum(p0, 1)
        if NBI == 2:
            p1 = _probs(x1, c1, m_new, P_SHIFT, QK_INT8)
            l_add += tl.sum(p1, 1)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + l_add
        acc = acc * alpha[:, None]
        acc = _pv(acc, p0, _load_v(V, VT, kb0, b, h, bh64, L, LP, v_base, svl, D, BLKK, USE_TMA, V_FP8), vinv,
                  BLKK, V_FP8, PV_F16, INTERPRET)
        if NBI == 2:
            acc = _pv(acc, p1, _load_v(V, VT, kb1, b, h, bh64, L, LP, v_base, svl, D, BLKK, USE_TMA, V_FP8), vinv,
                      BLKK, V_FP8, PV_F16, INTERPRET)
        m_i = m_new

    if V_FP8 or PV_F16:
        vsc = tl.load(VSC + bh64 * D + offs_d)  # per-channel V scale (fp8: P carries the 448)
        o = acc * vsc[None, :] * (1.0 / l_i)[:, None]
    else:
        o = acc * (1.0 / l_i)[:, None]
    # The sparse branch is a bf16 tensor in the reference; holding it as bf16
    # also frees the fp32 accumulator's registers for the epilogue.
    o = _cast(o, tl.bfloat16, INTERPRET)

    if HAS_LINEAR:
        if QK_INT8:
            qf = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        else:
            qf = q.to(tl.float32)
        e = tl.exp(qf - tl.max(qf, 1)[:, None])
        phi = _cast(e * (1.0 / tl.sum(e, 1))[:, None], tl.bfloat16, INTERPRET)  # softmax over D, bf16
        zz = tl.load(Z + bh64 * D + offs_d)
        den = tl.sum(phi.to(tl.float32) * zz[None, :], 1) + 1e-5
        kv = tl.load(KV + bh64 * D * D + offs_d[:, None] * D + offs_d[None, :])  # bf16 [D, D]
        o_l = _cast(_dot(phi, kv, INTERPRET) * (1.0 / den)[:, None], tl.bfloat16, INTERPRET)
        wt = tl.load(W + offs_d[:, None] * D + offs_d[None, :])  # W^T (host-transposed): wt[i, o] = W[o, i]
        pl = _dot(o_l, wt, INTERPRET)
        if HAS_BIAS:
            pl += tl.load(BIAS + offs_d).to(tl.float32)[None, :]
        o_f = o.to(tl.float32) + _bf16v(pl, INTERPRET)
    else:
        o_f = o.to(tl.float32)

    o_ptrs = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_d[None, :]
    tl.store(o_ptrs, _cast(o_f, O.dtype.element_ty, INTERPRET), mask=m_ok[:, None])


# Configs for the attention kernel: NBI key blocks per iteration, ROWS query
# rows per program (BLKQ, or BLKQ // 2 = two 4-warp programs per query block,
# two per SM), warps, pipeline stages; TMA=False forces pointer loads (TMA is
# used on sm90+ when the layouts allow). A config whose ROWS does not divide
# BLKQ is skipped. The first usable one is used without autotuning.
# H100 (triton 3.6), ms for the kernel with the linear epilogue (autotuning
# medians, two runs), SLA 1.3B / 14B; SageSLA 64x128 map, fp8 V and bf16 V 1.3B / 14B:
#   NBI=1 ROWS=128 8 warps 3 stages   1.60-1.64 / 26.0-26.2
#   NBI=1 ROWS=64  4 warps 3 stages   1.41-1.43 / 26.0-27.4   fp8 1.16-1.18 / 17.3-17.4; bf16 1.61 / 24.9-25.6
#   NBI=2 ROWS=128 8 warps 3 stages   1.56-1.62 / 25.1-26.3
#   NBI=1 ROWS=64  4 warps 2 stages   1.63-1.66 / 32-33      fp8 1.18-1.19 / 18.3;      bf16 1.22 / 20.7-21.2
# Session 12 (fp8 V, kernel alone, do_bench, two runs each): capped at 168 registers the 2-stage
# config fits three programs per SM (74 KB of shared memory each; its main loop stays spill-free,
# only the linear epilogue spills): 1.03-1.07 / 17.0-17.6 against 1.08-1.10 / 17.3 for 3 stages
# (1.13-1.14 / 18.4-21.4 uncapped); without the linear branch 0.84-0.88 vs 0.93 at 1.3B.
# (also tried: NBI=2 with 64 rows or 2 stages, 8 warps on 64 rows: slower;
# issuing the next q K^T before this softmax so they overlap: 30% slower in
# triton, which then passes P to the PV MMA through shared memory.)
ATTN_CONFIGS = [
    dict(NBI=1, ROWS=128, num_warps=8, num_stages=3),
    dict(NBI=1, ROWS=64, num_warps=4, num_stages=3),
    dict(NBI=2, ROWS=128, num_warps=8, num_stages=3),
    dict(NBI=1, ROWS=64, num_warps=4, num_stages=2),
    dict(NBI=1, ROWS=64, num_warps=4, num_stages=2, maxnreg=168),
]
INTERP_CONFIG = dict(NBI=2, num_warps=4, num_stages=1)  # ROWS = BLKQ
_tuned: dict = {}
TUNE_TIMES: dict = {}  # key -> [(config, ms)] of the last autotuning (for the benchmark)


def usable_configs(configs, blkq: int, qk_int8: bool = False, v_fp8: bool = False):
    """The configs that apply to these block sizes."""
    out = []
    for cfg in configs:
        rows = cfg.get("ROWS", blkq)
        if rows <= blkq and blkq % rows == 0:
            out.append(cfg)
    return out


def pick_config(key, configs, launch, tuned=None, times_log=None):
    """First call per key: time each config with do_bench, keep the fastest.

    `tuned` / `times_log` are the caller's caches (this module's by default), so
    each kernel module keeps its own tables for bench_kernels to print."""
    if INTERPRET:
        return configs[0]
    if not AUTOTUNE or len(configs) == 1:
        return configs[0]
    tuned = _tuned if tuned is None else tuned
    times_log = TUNE_TIMES if times_log is None else times_log
    if key not in tuned:
        from triton.testing import do_bench

        best, best_t, times = configs[0], float("inf"), []
        for cfg in configs:
            try:
                t = do_bench(lambda: launch(cfg), warmup=5, rep=100)  # >= 5 runs of a 20 ms kernel: stable picks
            except Exception:  # a config that does not fit (shared memory, registers)
                continue
            times.append((cfg, t))
            if t < best_t:
                best, best_t = cfg, t
        tuned[key] = best
        times_log[key] = times
    return tuned[key]


def _tma_descriptors(q, k, v, qc, kc, vt, qk_int8: bool, v_fp8: bool, blkk: int):
    """Host TMA descriptors (K, V, K codes, V^T) for `_sla_attn_kernel`, or None when
    TMA is unavailable (no sm90, old triton) or a layout does not allow it. K/V are
    seen as 2D [B*L, H*D] (row stride L's), codes as [B*H*L, D], V^T as [B*H*D, LP]."""
    if TensorDescriptor is None:
        return None
    if not INTERPRET and capability(q.device) < (9, 0):
        return None
    b, n, h, d = k.shape

    def flat_ok(t):  # [B,L,H,D] view whose rows (b, l) are equally spaced, heads packed
        return (t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == n * t.stride(1))
                and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)

    descs = [None, None, None, None]
    if qk_int8:
        descs[2] = TensorDescriptor(kc, [b * h * n, d], [d, 1], [blkk, d])
    elif flat_ok(k):
        descs[0] = TensorDescriptor(k, [b * n, h * d], [k.stride(1), 1], [blkk, d])
    else:
        return None
    if v_fp8:
        descs[3] = TensorDescriptor(vt, [b * h * d, vt.shape[-1]], [vt.shape[-1], 1], [d, blkk])
    elif flat_ok(v):
        descs[1] = TensorDescriptor(v, [b * n, h * d], [v.stride(1), 1], [blkk, d])
    else:
        return None
    return tuple(x if x is not None else y for x, y in zip(descs, (k, v, kc, vt)))


def attention_launch(q, k, v, lut, *, proj_w=None, proj_b=None, sage=None, blkq=BLKQ, blkk=BLKK,
                     config=None, linear=None):
    """Run `_sla_attn_kernel` on bf16 [B,L,H,D] q/k/v and a LUT from `block_lut`
    (int32, ascending block indices per query block: the kernel masks the
    partial last key block only in its last iteration).

    sage: None, or dict(qc, qs, kc, ks, vsc, vt=None) from sagesla_triton: with vt, fp8 V^T and its
    per-channel scale; without, P and V in fp16, V divided by vsc per channel (`fp16_v_scale`).
    linear: a precomputed `linear_state(k, v)` (else computed here when proj_w is given).
    Returns [B,L,H,D] bf16.
    """
    b, n, h, d = q.shape
    mq, kk = lut.shape[-2:]
    nk = triton.cdiv(n, blkk)
    out = torch.empty(b, n, h, d, dtype=torch.bfloat16, device=q.device)
    has_linear = proj_w is not None
    if has_linear:
        kv, z = linear if linear is not None else linear_state(k, v)
        w = proj_w.to(device=q.device, dtype=torch.bfloat16).t().contiguous()  # W^T, read coalesced
        bias = proj_b.to(device=q.device, dtype=torch.bfloat16).contiguous() if proj_b is not None else w
    else:
        kv = z = w = bias = out
    qk_int8 = sage is not None
    v_fp8 = qk_int8 and sage.get("vt") is not None
    pv_f16 = qk_int8 and not v_fp8
    if qk_int8:
        qc, qs, kc, ks, vsc = sage["qc"], sage["qs"], sage["kc"], sage["ks"], sage["vsc"]
        vt = sage["vt"] if v_fp8 else out
        lp = vt.shape[-1] if v_fp8 else n
    else:
        qc = qs = kc = ks = vt = vsc = out
        lp = n
    scale = LOG2E / math.sqrt(d)
    descs = _tma_descriptors(q, k, v, qc, kc, vt, qk_int8, v_fp8, blkk)

    def launch(cfg):
        cfg = dict(cfg)
        nbi = cfg.pop("NBI")
        rows = cfg.pop("ROWS", blkq)
        use_tma = cfg.pop("TMA", True) and descs is not None
        k_a, v_a, kc_a, vt_a = descs if use_tma else (k, v, kc, vt)
        _sla_attn_kernel[(mq * (blkq // rows), b * h)](
            q, k_a, v_a, out, lut, qc, kc_a, qs, ks, vt_a, vsc, kv, z, w, bias,
            n, h, mq, nk, kk, lp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            scale, D=d, BLKQ=blkq, BLKK=blkk, NBI=nbi, ROWS=rows, USE_TMA=use_tma,
            HAS_LINEAR=has_linear, HAS_BIAS=proj_b is not None,
            QK_INT8=qk_int8, V_FP8=v_fp8, PV_F16=pv_f16, INTERPRET=INTERPRET, **cfg)

    if config is None:
        key = ("attn", n, h, b, kk, d, blkq, blkk, has_linear, qk_int8, v_fp8)
        configs = [INTERP_CONFIG] if INTERPRET else usable_configs(ATTN_CONFIGS, blkq, qk_int8, v_fp8)
        config = pick_config(key, configs, launch)
    launch(config)
    return out


def supports(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (q.is_cuda or INTERPRET) and q.dim() == 4 and d in (64, 128) \
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)


def sla_forward(q, k, v, proj_l_weight=None, proj_l_bias=None, topk: float = 0.1, *,
                blkq: int = BLKQ, blkk: int = BLKK, config=None):
    """SLA on [B,L,H,D]; same contract as `sla_attention` (returns q's dtype)."""
    dtype = q.dtype
    q, k, v = (_check_layout(t) for t in (q, k, v))
    lut = block_lut(q, k, topk, blkq, blkk)  # scored in the input dtype, as the reference
    if dtype != torch.bfloat16:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = attention_launch(q, k, v, lut, proj_w=proj_l_weight, proj_b=proj_l_bias, blkq=blkq, blkk=blkk,
                           config=config)
    return out if dtype == torch.bfloat16 else out.to(dtype)


def sla_backend(q, k, v, proj_l_weight, proj_l_bias, topk):
    """The function registered as attention backend "sla"."""
    if not supports(q):
        from ..attention import say_once
        from ..attention.sla_reference import sla_attention

        say_once(f"sla Triton kernel: unsupported input {tuple(q.shape)} {q.dtype}, using the reference")
        return sla_attention(q, k, v, proj_l_weight, proj_l_bias, topk=topk)
    return sla_forward(q, k, v, proj_l_weight, proj_l_bias, topk)
