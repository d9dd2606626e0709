"""W8A8 int8 linear in Triton: activation quantisation + int8 GEMM (spec 2.3, 2.4).

`W8A8Kernel()` is the object `turbo_core.kernels.install()` assigns to
`Int8Linear.kernel`: `supports(x)` and `__call__(x, int8_weight, scale, bias)`, or
its two halves `quantize(x2)` and `gemm(quantized_input, int8_weight, scale, bias)`
(one quantisation shared by the layers that read the same input).

quantize_act (`_act_quant_kernel`): one program per 128 rows x 128 channels
tile; amax = max(max|x|, 1e-8) in fp32, q = rint(x * (128/amax)) (IEEE
division `div_rn`, round half to even) saturated to [-128, 127],
scale = amax/128. Out-of-range rows/columns count as 0. Bit-exact to
`quantize_int8` (which is the CUDA kernel's formula without its fast-math
division).

w8a8_gemm (`_w8a8_gemm_kernel`): for the 128-wide K tiles kt=0,1,.. in that order,
acc = fma(float(int32 dot of the tile), s_x[m/128,kt] * s_w[n/128,kt], acc) in
fp32 (the official kernel's arithmetic); then cast to x's dtype, then + bias in
that dtype (`w8a8_linear_reference`, bit-exact; the interpreter takes the FMA in
fp64 as the reference does). BLOCK_M is 128 or 64 and the
output columns go in chunks of 64 or 128, so s_x * s_w is one scalar per K tile
and chunk. Each tile's int32 product is converted by I2F (exact: |tile sum| <=
2^21); on the H100 that measured 0-5% faster than the integer-add (1.5*2^23)
trick, which costs two instructions. On sm90 `w8a8_gluon` adds warp-specialised
configs to the autotuner (the same arithmetic). Both take the block's gated residual add into
their epilogue (`residual=`, `gate=`: residual + y * gate, rounded as torch's ops), so the
block never writes the projection's output to read it back. Tiles come in by TMA
(host tensor descriptors, sm90) when K is a multiple of 16, else by masked
pointer loads; K need not be a multiple of 128 (zero-filled / masked).

Why the tiles are small: triton waits for an int32-accumulating wgmma right after
issuing it (its async-dot pass only pipelines fp32 accumulators), so one program
cannot overlap its rescale with its next MMA; two or three 4-warp programs per SM
can. The rescale costs 2 instructions per output element and K tile (convert,
FMA), i.e. 2/128 SM issue cycles against 128 MACs at 4096 int8 MAC/cycle (1/32
cycle): half the MMA time, so this kernel stays near bf16 cuBLAS speed on an
H100 (bench/RESULTS.md has the variants tried).

Rounding to int8 is the 1.5*2^23 trick everywhere (`_int8_code`: adds and a bit cast, no
conversion instructions). Interpreter: int8 dots are exact there, and bf16 outputs are
rounded with an explicit RNE (its own cast truncates).
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ..quant.int8 import QuantizedInput
from . import sla_triton, w8a8_gluon
from .residual_norm_triton import NORM_AFFINE, NORM_MODULATE, _norm_out
from .sla_triton import AUTOTUNE, INTERPRET, _cast, _int8_code, _to_f32, pick_config

try:  # triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

log = logging.getLogger("turbo_core")

TILE = 128


# torch's tanh GELU constants as its CUDA kernel rounds them to fp32: kBeta = sqrt(2) * 2/sqrt(pi) * 0.5
GELU_BETA = tl.constexpr(0.7978845834732056)
GELU_KAPPA = tl.constexpr(0.044714998453855515)
TANH_SATURATE = tl.constexpr(8.664339742)  # torch's CPU tanh (Sleef) returns +-1 beyond this


@triton.jit
def _gelu_tanh(x, INTERPRET: tl.constexpr):
    """fp32 x -> GELU(approximate="tanh") = 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3).

    GPU: as x * sigmoid(2u) = x * rcp(1 + 2^(-2u log2 e)) -- one ex2 and one MUFU reciprocal,
    within a few fp32 ulps of torch's value (libdevice's tanhf made the fused pass
    compute-bound: slower than torch's GELU plus a separate quantisation, RESULTS session 6).
    The reciprocal is rcp.approx itself: `/` (div.full) is the same product for 1 + e < 2^126
    but adds a range check: 445 us for the pass at 32760 x 8960 against 348 us with this (H100,
    RESULTS.md session 8); beyond 2^126 this gives torch's -0.0, not a tiny x/(1+e).
    Interpreter: tanh in fp64, saturated where torch's CPU tanh is -- bit-identical to torch's
    CPU GELU on every finite bf16 and fp16 input (tests check it exhaustively)."""
    inner = GELU_BETA * tl.fma(x * x * x, GELU_KAPPA, x)
    if INTERPRET:
        u = tl.minimum(tl.maximum(inner, -30.0), 30.0).to(tl.float64)
        t = (1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)).to(tl.float32)
        t = tl.where(tl.abs(inner) > TANH_SATURATE, tl.where(inner > 0, 1.0, -1.0), t)
        g = 0.5 * x * (1.0 + t)
    else:  # -2 log2(e): exp(-2u); 1 / inf = 0 -> -0.0 as torch
        e = tl.exp2(inner * -2.8853900817779268)
        g = x * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                          is_pure=True, pack=1)
    return g


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(X, XQ, XS, M, K, KT, sxm,
                      GELU: tl.constexpr, INTERPRET: tl.constexpr):
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pm * 128 + tl.arange(0, 128)
    cols = pk * 128 + tl.arange(0, 128)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = _to_f32(tl.load(X + rows[:, None].to(tl.int64) * sxm + cols[None, :], mask=mask, other=0.0), INTERPRET)
    if GELU:  # the FFN hidden state: its GELU, rounded to x's dtype as the torch module returns it
        x = _to_f32(_cast(_gelu_tanh(x, INTERPRET), X.dtype.element_ty, INTERPRET), INTERPRET)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-8)
    mult = tl.math.div_rn(128.0, amax)
    tl.store(XQ + rows[:, None].to(tl.int64) * K + cols[None, :], _int8_code(x * mult), mask=mask)
    tl.store(XS + pm * KT + pk, amax * 0.0078125)


def quantize_act(x2: torch.Tensor, *, gelu: bool = False):
    """x [M, K] (bf16/fp16/fp32, unit column stride) -> (int8 [M, K], fp32 [ceil(M/128), ceil(K/128)]).

    gelu=True quantises GELU_tanh(x) rounded to x's dtype instead: the FFN hidden state in one
    pass (read 2 bytes, write 1) instead of torch's GELU and then this (read 2, write 2, read 2,
    write 1)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    mt, kt = triton.cdiv(m, TILE), triton.cdiv(k, TILE)
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    s = torch.empty(mt, kt, dtype=torch.float32, device=x2.device)
    if m == 0 or k == 0:
        return q, s
    # GELU: 16 warps (its ex2 + rcp per element want more warps in flight): 168 / 254 us against 177 / 267
    # on 8 at the 1.3B / 14B FFN passes; without it 4-16 warps are alike (H100, RESULTS session 17)
    _act_quant_kernel[(mt, kt)](x2, q, s, m, k, kt, x2.stride(0), GELU=gelu, INTERPRET=INTERPRET,
                                num_warps=16 if gelu else 8, **({} if INTERPRET else {"enable_fp_fusion": False}))
    return q, s


# x's strides stay specialised: their divisibility by 16 lets the loads be 16-byte vectors (unspecialised,
# each bf16 came in alone: 1.6 instead of 2.5 TB/s on the H100)
@triton.jit(do_not_specialize=["M", "L", "ssb", "stb"])
def _norm_quant_kernel(X, ST, W, BI, SH, SC, XQ, XS, M, L, K, KT, sxb, sxl, ssb, stb,
                       NORM: tl.constexpr, ONE_BATCH: tl.constexpr, INTERPRET: tl.constexpr):
    """`_act_quant_kernel` on the normed rows of x [B, L, K] (rows b * L + l), made from x and the
    norm's per-row (mean, rstd) with `residual_norm_triton`'s own `_norm_out`: the codes of the
    normed tensor, which is never written (NORM: NORM_AFFINE with W, BI; NORM_MODULATE with SH, SC)."""
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pm * 128 + tl.arange(0, 128)
    cols = pk * 128 + tl.arange(0, 128)
    rmask = rows < M
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    b = (rows // L).to(tl.int64)[:, None]
    l = (rows % L).to(tl.int64)[:, None]
    dt = X.dtype.element_ty
    x = tl.load(X + b * sxb + l * sxl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # one load per row (a [128, 1] load would be one per element)
    mean = tl.load(ST + rows.to(tl.int64) * 2, mask=rmask, other=0.0)[:, None]
    rstd = tl.load(ST + rows.to(tl.int64) * 2 + 1, mask=rmask, other=0.0)[:, None]
    if ONE_BATCH:  # one video: the AdaLN shift / scale are one [128] vector per tile, not a gather
        vb, vmask = 0, cmask[None, :]
    else:
        vb, vmask = b, mask
    h = _norm_out((x - mean) * rstd, W, BI, SH, SC, vb, cols[None, :], vmask, ssb, stb, dt, NORM, INTERPRET)
    h = tl.where(mask, _to_f32(h, INTERPRET), 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(h), 1), 0), 1e-8)
    mult = tl.math.div_rn(128.0, amax)
    tl.store(XQ + rows[:, None].to(tl.int64) * K + cols[None, :], _int8_code(h * mult), mask=mask)
    tl.store(XS + pm * KT + pk, amax * 0.0078125)


def quantize_norm(x, stats, *, weight=None, bias=None, shift=None, scale=None):
    """quantize_act of x's LayerNorm, affine (weight, bias fp32 [K]) or AdaLN-modulated (shift,
    scale fp32 [B, 1, K] views), from the per-row stats [B, L, 2] of
    `residual_norm_triton.norm_stats`: the codes of the tensor `residual_norm_triton.norm` returns,
    made from x (read 2 bytes per element) instead of written and read back (2 + 2).
    x [B, L, K] with unit last stride -> (int8 [B*L, K], fp32 tile scales)."""
    bsz, n, k = x.shape
    m = bsz * n
    if x.stride(-1) != 1:
        x = x.contiguous()
    if stats.shape != (bsz, n, 2) or not stats.is_contiguous():
        raise ValueError(f"quantize_norm: stats must be contiguous [{bsz}, {n}, 2], got {tuple(stats.shape)}")
    mt, kt = triton.cdiv(m, TILE), triton.cdiv(k, TILE)
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(mt, kt, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    if weight is not None:
        norm, w, bi, sh, sc = NORM_AFFINE, weight.float().contiguous(), bias.float().contiguous(), stats, stats
        ssb = stb = 0
    else:
        norm, w, bi = NORM_MODULATE, stats, stats
        sh, sc = (t.float().expand(bsz, 1, k) for t in (shift, scale))
        sh, sc = (t if t.stride(-1) == 1 else t.contiguous() for t in (sh, sc))
        ssb, stb = sh.stride(0), sc.stride(0)
    _norm_quant_kernel[(mt, kt)](x, stats, w, bi, sh, sc, q, s, m, n, k, kt, x.stride(0), x.stride(1), ssb, stb,
                                 NORM=norm, ONE_BATCH=bsz == 1, INTERPRET=INTERPRET, num_warps=8,
                                 **({} if INTERPRET else {"enable_fp_fusion": False}))
    return q, s


@triton.jit
def _gemm_tile(X, r0, k0, R, K, BR: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """int8 [BR, 128] tile at (r0, k0): a TMA load from a tensor descriptor, or
    masked pointer loads (rows past R re-read valid ones; their results are not stored)."""
    if USE_TMA:
        t = X.load([r0, k0])  # zero-filled outside [R, K]
    else:
        rows = (r0 + tl.arange(0, BR)) % R
        cols = k0 + tl.arange(0, 128)
        ptrs = X + rows[:, None].to(tl.int64) * K + cols[None, :]
        if EVEN_K:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=(cols < K)[None, :], other=0)
    return t


@triton.jit
def _fma(part, scale, acc, INTERPRET: tl.constexpr):
    """acc + part * scale rounded once (the GPU's FMA; fp64 in the interpreter, whose fma rounds twice)."""
    if INTERPRET:
        return (part.to(tl.float64) * scale.to(tl.float64) + acc.to(tl.float64)).to(tl.float32)
    return tl.fma(part, scale, acc)


@triton.jit
def _residual(y, r, G, offs_n, N, dt: tl.constexpr, HAS_GATE: tl.constexpr, INTERPRET: tl.constexpr):
    """r + y * gate.to(dt) (or r + y) in dt, each product and sum rounded to dt: the block's
    gated residual as torch's dt ops (and residual_norm_triton) round it."""
    y = y.to(tl.float32)
    if HAS_GATE:
        g = _cast(tl.load(G + offs_n, mask=offs_n < N, other=0.0), dt, INTERPRET).to(tl.float32)
        y = _cast(y * g[None, :], dt, INTERPRET).to(tl.float32)
    return _cast(r.to(tl.float32) + y, dt, INTERPRET)


@triton.jit
def _gemm_store(Y, BIAS, R, G, acc, off_m, n0, M, N,
                BLOCK_M: tl.constexpr, CHUNK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, INTERPRET: tl.constexpr):
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, CHUNK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    dt: tl.constexpr = Y.dtype.element_ty
    y = _cast(acc, dt, INTERPRET)  # cast to x's dtype first ...
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = _cast(y.to(tl.float32) + bias[None, :], dt, INTERPRET)  # ... then + bias in it
    if HAS_RES:
        y = _residual(y, tl.load(R + offs, mask=mask, other=0.0), G, offs_n, N, dt, HAS_GATE, INTERPRET)
    tl.store(Y + offs, y, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _w8a8_gemm_kernel(A, AS, W, WS, BIAS, R, G, Y,
                      M, N, K, KT,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
                      EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr,
                      GROUP_M: tl.constexpr, INTERPRET: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row tiles share the same W column tiles in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % group) % gsize
    pn = (pid % group) // gsize
    off_m = pm * BLOCK_M
    off_n0 = pn * BLOCK_N
    off_n1 = off_n0 + CHUNK_N
    # BLOCK_M <= 128 and CHUNK_N <= 128 lie inside one 128x128 scale tile each:
    # s_x * s_w is one scalar per K tile and column chunk.
    last_nt = tl.cdiv(N, 128) - 1
    sa_ptr = AS + (off_m // 128) * KT
    sw0_ptr = WS + (off_n0 // 128) * KT
    sw1_ptr = WS + tl.minimum(off_n1 // 128, last_nt) * KT

    # The int32 product of each K tile is kept apart from the fp32 accumulator
    # (the official order). Small 4-warp programs (and column chunks, which bound
    # the live int32 tile) let 2-3 programs share an SM, so one's rescale overlaps
    # another's MMA: triton waits on an int32 wgmma right after issuing it.
    acc0 = tl.zeros([BLOCK_M, CHUNK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_M, CHUNK_N], tl.float32)
    for kt in range(0, KT):
        k0 = kt * BLOCK_K
        a = _gemm_tile(A, off_m, k0, M, K, BLOCK_M, USE_TMA, EVEN_K)
        sa = tl.load(sa_ptr + kt)
        w0 = _gemm_tile(W, off_n0, k0, N, K, CHUNK_N, USE_TMA, EVEN_K)
        s0 = sa * tl.load(sw0_ptr + kt)
        acc0 = _fma(tl.dot(a, tl.trans(w0)).to(tl.float32), s0, acc0, INTERPRET)  # |part| <= 2^21: exact
        if BLOCK_N > CHUNK_N:
            w1 = _gemm_tile(W, off_n1, k0, N, K, CHUNK_N, USE_TMA, EVEN_K)
            s1 = sa * tl.load(sw1_ptr + kt)
            acc1 = _fma(tl.dot(a, tl.trans(w1)).to(tl.float32), s1, acc1, INTERPRET)

    _gemm_store(Y, BIAS, R, G, acc0, off_m, off_n0, M, N, BLOCK_M, CHUNK_N, HAS_BIAS, HAS_RES, HAS_GATE, INTERPRET)
    if BLOCK_N > CHUNK_N:
        _gemm_store(Y, BIAS, R, G, acc1, off_m, off_n1, M, N, BLOCK_M, CHUNK_N, HAS_BIAS, HAS_RES, HAS_GATE,
                    INTERPRET)


# BLOCK_M in (64, 128); BLOCK_N = CHUNK_N or 2 * CHUNK_N, CHUNK_N in (64, 128).
# H100 (triton 3.6), int8 GEMM ms at M=32760 for (K,N) = (1536,1536) (1536,8960)
# (8960,1536) (5120,13824), and programs per SM (registers, shared memory):
#   64x128, 4 warps, 4 stages (168 regs, 96 KB: 2/SM)      0.231 1.35 1.20 6.16
#   64x128 in 64-col chunks, 4 warps (146 regs, 72 KB: 3)  0.226 1.34 1.26 6.55
#   128x128, 8 warps (204 regs: 1)                         0.266 1.50 1.33 6.54
#   (128x128 in 64-col chunks on 4 or 8 warps: slower)
# With I2F instead of the integer-add conversion (session 3, same GPU): 0.207-0.254,
# 1.27-1.45, 1.22-1.26, 6.22-6.81 for these three, and 128x256 in 128-col chunks on
# 8 warps (144 KB shared: too big for sm8x, skipped there by the autotuner) 0.226 1.27
# 1.19 5.85. The first config is the default without autotuning.
GEMM_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=128, CHUNK_N=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, CHUNK_N=64, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, CHUNK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, CHUNK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
]
INTERP_GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, CHUNK_N=64, GROUP_M=4, num_warps=4, num_stages=1)
_tuned: dict = {}
TUNE_TIMES: dict = {}  # key -> [(config, ms)] of the last autotuning (for the benchmark)


def _tma_ok(*tensors) -> bool:
    """Host-side TMA descriptors need 16-byte aligned bases and row strides."""
    if TensorDescriptor is None:
        return False
    if not INTERPRET and sla_triton.capability(tensors[0].device) < (9, 0):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) == 1 for t in tensors)


_gluon_state: dict = {}  # "error": why the Gluon kernel is not used in this process


def _gluon_agrees(launch, y) -> bool:
    """Before the Gluon configs join a new shape's autotuning: its first config must build and
    give the Triton kernel's result bit for bit (the same arithmetic), else it is dropped for
    this process, with a warning (another triton's Gluon may build differently)."""
    if "error" in _gluon_state:
        return False
    try:
        launch(GEMM_CONFIGS[0])
        expect = y.clone()
        launch(w8a8_gluon.CONFIGS[0])
        ok = torch.equal(y, expect)
        why = None if ok else f"{int((y != expect).sum())} of {y.numel()} outputs differ from the Triton kernel's"
    except Exception as exc:  # a Gluon API this code does not know
        why = f"{type(exc).__name__}: {exc}"
    if why is None:
        return True
    _gluon_state["error"] = why
    log.warning("W8A8: the sm90 Gluon GEMM is not used (%s); the Triton kernel runs", why)
    return False


def w8a8_gemm(xq, xs, wq, ws, bias=None, out_dtype=torch.bfloat16, *, config=None, residual=None, gate=None,
              out=None):
    """int8 xq [M,K] with tile scales xs, int8 wq [N,K] with ws -> y [M,N] in out_dtype (bit-exact).

    With `residual` [M,N] (contiguous, out_dtype): residual + y * gate.to(out_dtype) instead, or
    residual + y without `gate` ([N], one gate for every row) -- the block's gated residual add
    done by the GEMM's epilogue, rounded as torch's ops in out_dtype, so the [M,N] product is never
    written and read back. `out`: a contiguous [M,N] tensor to write (e.g. rows of a larger one)."""
    m, k = xq.shape
    n = wq.shape[0]
    kt = triton.cdiv(k, TILE)
    if out is None:
        y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"w8a8_gemm: out must be a contiguous [{m}, {n}] {out_dtype} tensor")
    else:
        y = out
    if residual is not None and (residual.shape != (m, n) or residual.dtype != out_dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"w8a8_gemm: residual must be a contiguous [{m}, {n}] {out_dtype} tensor")
    if gate is not None:
        if residual is None or gate.numel() != n:
            raise ValueError(f"w8a8_gemm: gate must be [{n}] and comes with a residual")
        gate = gate.to(device=xq.device, dtype=torch.float32).reshape(n).contiguous()
    if m == 0 or n == 0:
        return y
    xq = xq.contiguous()
    wq = wq.contiguous()
    xs = xs.contiguous()
    ws = ws.to(device=xq.device, dtype=torch.float32).contiguous()
    b = bias.to(device=xq.device, dtype=out_dtype).contiguous() if bias is not None else y
    use_tma = _tma_ok(xq, wq)
    # fp fusion off: the only FMA is the explicit one (the epilogue's cast, then + bias, stays as written)
    extra = {} if INTERPRET else {"enable_fp_fusion": False}

    def launch(cfg):
        if cfg.get("GLUON"):
            return w8a8_gluon.gemm_into(y, xq, xs, wq, ws, None if bias is None else b, cfg, residual, gate)
        cfg = dict(cfg)
        bm, bn, ch = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.pop("CHUNK_N")
        if use_tma:
            a_arg = TensorDescriptor.from_tensor(xq, [bm, TILE])
            w_arg = TensorDescriptor.from_tensor(wq, [ch, TILE])
        else:
            a_arg, w_arg = xq, wq
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _w8a8_gemm_kernel[grid](a_arg, xs, w_arg, ws, b, residual, gate, y, m, n, k, kt,
                                HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_GATE=gate is not None,
                                EVEN_K=k % TILE == 0, USE_TMA=use_tma, CHUNK_N=ch, INTERPRET=INTERPRET, **cfg, **extra)

    if config is None:
        if INTERPRET:
            config = INTERP_GEMM_CONFIG
        else:
            key = (m, n, k, out_dtype, bias is not None, use_tma, residual is not None, gate is not None)
            configs = GEMM_CONFIGS
            gluon_ok = use_tma and w8a8_gluon.usable(xq.device) and (residual is None
                                                                   or w8a8_gluon.residual_ok(y, residual))
            if AUTOTUNE and key not in _tuned and gluon_ok and _gluon_agrees(launch, y):
                configs = GEMM_CONFIGS + w8a8_gluon.CONFIGS  # sm90: the warp-specialised Gluon kernel competes
            config = pick_config(key, configs, launch, _tuned, TUNE_TIMES)
    launch(config)
    return y


class W8A8Kernel:
    """Fast W8A8 for `Int8Linear` (mode "w8a8"): quantize_act + w8a8_gemm (bit-exact)."""

    def supports(self, x: torch.Tensor) -> bool:
        return (x.is_cuda or INTERPRET) and x.dtype in (torch.bfloat16, torch.float16) and x.dim() >= 1

    def __call__(self, x, int8_weight, scale, bias=None):
        qx = QuantizedInput(*quantize_act(x.reshape(-1, x.shape[-1])), x.shape, x.dtype)
        return self.gemm(qx, int8_weight, scale, bias)

    def quantize(self, x2, gelu: bool = False):
        """[M, K] -> (int8 codes, tile scales): the activation half, for `quant.int8.shared_input`
        (gelu=True: of GELU_tanh(x2), the FFN hidden state)."""
        return quantize_act(x2, gelu=gelu)

    def quantize_norm(self, x, stats, norm: dict):
        """x's LayerNorm (`norm`: weight / bias or shift / scale) made from its row stats straight to
        (codes, tile scales): `quantize_norm`, for `models.dit.Block`."""
        return quantize_norm(x, stats, **norm)

    def gemm(self, qx, int8_weight, scale, bias=None, residual=None, gate=None, out=None):
        """The GEMM half on a `quant.int8.QuantizedInput`; with `residual` (and `gate`, [N]),
        residual + y * gate.to(dtype) from the GEMM's epilogue (`w8a8_gemm`), written to `out` if given."""
        n = int8_weight.shape[0]
        residual = None if residual is None else residual.view(-1, n)  # [..., N] -> [M, N], no copy
        y = w8a8_gemm(qx.codes, qx.scales, int8_weight, scale, bias, qx.dtype, residual=residual, gate=gate,
                      out=None if out is None else out.view(-1, n))
        return y.reshape(*qx.shape[:-1], n) if out is None else out

    def __repr__(self) -> str:
        return "W8A8Kernel()"
