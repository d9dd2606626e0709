"""W8A8 int8 linear in Triton: activation quantisation + int8 GEMM (spec 2.3, 2.4).

`W8A8Kernel()` is the object `turbo_core.kernels.install()` assigns to
`Int8Linear.kernel`: `supports(x)` and `__call__(x, int8_weight, scale, bias)`.

quantize_act (`_act_quant_kernel`): one program per 128 rows x 128 channels
tile; amax = max(max|x|, 1e-8) in fp32, q = rint(x * (128/amax)) (IEEE
division `div_rn`, round half to even) saturated to [-128, 127],
scale = amax/128. Out-of-range rows/columns count as 0. Bit-exact to
`quantize_int8` (which is the CUDA kernel's formula without its fast-math
division).

w8a8_gemm (`_w8a8_gemm_kernel`): y[M,N] = sum over 128-wide K tiles kt=0,1,..
(in that order) of  float(int32 dot of the tile) * (s_x[m/128,kt] * s_w[n/128,kt])
accumulated in fp32; then cast to x's dtype, then + bias in that dtype
(`w8a8_linear_reference`'s order). BLOCK_M is 128 or 64 (one activation scale
per program and K tile), BLOCK_N a multiple of 128, BLOCK_K = 128. Each tile's
int32 product is kept apart from the fp32 accumulator and converted with an
exact integer-add trick (|tile sum| <= 2^21) instead of the slow I2F unit. With exact=True (the
default) the kernel is compiled with enable_fp_fusion=False, so the
scale-and-add is a separate multiply and add as in the reference (bit-exact);
exact=False lets the compiler fuse them into an FMA (differs by at most about
1 bf16 ulp). K need not be a multiple of 128 (masked).

Interpreter: int8 dots are exact there; rint is done with the 1.5*2^23 trick
(libdevice is not available) and bf16 outputs are rounded with an explicit RNE
(its own cast truncates).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sla_triton import AUTOTUNE, INTERPRET, _cast, _i32_to_f32

try:  # triton >= 3.1
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    from triton.language.extra.cuda import libdevice

TILE = 128


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(X, XQ, XS, M, K, KT, sxm,
                      INTERPRET: tl.constexpr):
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pm * 128 + tl.arange(0, 128)
    cols = pk * 128 + tl.arange(0, 128)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-8)
    mult = tl.math.div_rn(128.0, amax)
    y = x * mult
    if INTERPRET:
        r = (y + 12582912.0) - 12582912.0  # round half to even for |y| < 2^22
    else:
        r = libdevice.rint(y)
    r = tl.minimum(tl.maximum(r, -128.0), 127.0)
    tl.store(XQ + rows[:, None].to(tl.int64) * K + cols[None, :], r.to(tl.int8), mask=mask)
    tl.store(XS + pm * KT + pk, amax * 0.0078125)


def quantize_act(x2: torch.Tensor):
    """x [M, K] (bf16/fp16/fp32, unit column stride) -> (int8 [M, K], fp32 [ceil(M/128), ceil(K/128)])."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    mt, kt = triton.cdiv(m, TILE), triton.cdiv(k, TILE)
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    s = torch.empty(mt, kt, dtype=torch.float32, device=x2.device)
    if m == 0 or k == 0:
        return q, s
    _act_quant_kernel[(mt, kt)](x2, q, s, m, k, kt, x2.stride(0), INTERPRET=INTERPRET,
                                num_warps=8, **({} if INTERPRET else {"enable_fp_fusion": False}))
    return q, s


@triton.jit(do_not_specialize=["M"])
def _w8a8_gemm_kernel(A, AS, W, WS, BIAS, Y,
                      M, N, K, KT,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr):
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

    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/cols past the end re-read valid ones (wrapped); their results are not stored
    am = offs_m % M
    wn = offs_n % N
    a_ptrs = A + am[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptrs = W + wn[:, None].to(tl.int64) * K + offs_k[None, :]
    sa_ptr = AS + ((pm * BLOCK_M) // 128) * KT  # one activation scale per K tile (BLOCK_M <= 128)
    sw_ptrs = WS + (wn // 128) * KT     # one weight scale per 128 output columns and K tile

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kt in range(0, KT):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        part = tl.dot(a, tl.trans(w))  # int32 (exact), kept apart from the fp32 accumulator
        s = tl.load(sa_ptr + kt) * tl.load(sw_ptrs + kt)  # s_x * s_w in fp32, [BLOCK_N]
        acc += _i32_to_f32(part) * s[None, :]  # |part| <= 2^21: exact conversion
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    y = _cast(acc, Y.dtype.element_ty, INTERPRET)  # cast to x's dtype first ...
    if HAS_BIAS:
        bias = tl.load(BIAS + wn).to(tl.float32)
        y = _cast(y.to(tl.float32) + bias[None, :], Y.dtype.element_ty, INTERPRET)  # ... then + bias in it
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, y, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# The int32 tile product and the fp32 accumulator are both live: a 128x128 tile
# costs 128 registers per thread with 8 warps; 128x256 would spill on sm90.
GEMM_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4),
]
INTERP_GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=4, num_warps=4, num_stages=1)
_tuned: dict = {}


def w8a8_gemm(xq, xs, wq, ws, bias=None, out_dtype=torch.bfloat16, *, exact: bool = True, config=None):
    """int8 xq [M,K] with tile scales xs, int8 wq [N,K] with ws -> y [M,N] in out_dtype."""
    m, k = xq.shape
    n = wq.shape[0]
    kt = triton.cdiv(k, TILE)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    wq = wq.contiguous()
    ws = ws.to(device=xq.device, dtype=torch.float32).contiguous()
    b = bias.to(device=xq.device, dtype=out_dtype).contiguous() if bias is not None else y
    extra = {} if INTERPRET else {"enable_fp_fusion": not exact}

    def launch(cfg):
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w8a8_gemm_kernel[grid](xq, xs, wq, ws, b, y, m, n, k, kt,
                                HAS_BIAS=bias is not None, EVEN_K=k % TILE == 0,
                                INTERPRET=INTERPRET, **cfg, **extra)

    if config is None:
        if INTERPRET:
            config = INTERP_GEMM_CONFIG
        elif not AUTOTUNE:
            config = GEMM_CONFIGS[0]
        else:
            key = (m, n, k, out_dtype, bias is not None, exact)
            if key not in _tuned:
                from triton.testing import do_bench

                best, best_t = GEMM_CONFIGS[0], float("inf")
                for cfg in GEMM_CONFIGS:
                    try:
                        t = do_bench(lambda: launch(cfg), warmup=5, rep=20)
                    except Exception:
                        continue
                    if t < best_t:
                        best, best_t = cfg, t
                _tuned[key] = best
            config = _tuned[key]
    launch(config)
    return y


class W8A8Kernel:
    """Fast W8A8 for `Int8Linear` (mode "w8a8"): quantize_act + w8a8_gemm."""

    def __init__(self, exact: bool = True):
        self.exact = exact

    def supports(self, x: torch.Tensor) -> bool:
        return (x.is_cuda or INTERPRET) and x.dtype in (torch.bfloat16, torch.float16) and x.dim() >= 1

    def __call__(self, x, int8_weight, scale, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_act(x2)
        y = w8a8_gemm(xq, xs, int8_weight, scale, bias, x.dtype, exact=self.exact)
        return y.reshape(*shape[:-1], int8_weight.shape[0])

    def __repr__(self) -> str:
        return f"W8A8Kernel(exact={self.exact})"
