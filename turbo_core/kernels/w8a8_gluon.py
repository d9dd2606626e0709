"""The W8A8 int8 GEMM for sm90 (H100/H200/H20) in Gluon: persistent and warp-specialised.

Same arithmetic as `w8a8_triton._w8a8_gemm_kernel`, bit for bit: per 128-wide K tile, in order,
acc = fma(float(int32 tile), s_x * s_w, acc) in fp32; then cast to the output dtype, then + bias in
it. `w8a8_triton.w8a8_gemm` adds `CONFIGS` to its autotuner on sm90 once this kernel agreed with
the Triton one, so each GEMM shape runs whichever is faster there.

Layout of one program (one per SM, looping over output tiles of 192 x 128):
- a producer warp issues the TMA loads of each K tile (three 64 x 128 slices of A and one
  128 x 128 tile of W) into a ring of STAGES shared-memory stages, as soon as a stage is free;
- three consumer warpgroups each own 64 rows of the tile: wait for the stage, issue the int8
  wgmma, wait for it, free the stage, rescale the int32 product into their fp32 accumulator.
  While one warpgroup rescales (CUDA cores), the others' MMAs keep the tensor cores busy. The
  epilogue (cast, bias) writes the tile to shared memory and leaves the store to the TMA unit
  (8 stmatrix + 1 TMA instruction instead of 32 masked global stores per thread: 15-28% faster
  at K = 1536, where a tile's epilogue is long next to its 12 K tiles); outputs TMA cannot store
  (fp32, rows not 16-byte aligned) are stored from registers.
- with a residual (the block's gated residual add, `w8a8_triton.w8a8_gemm(residual=, gate=)`),
  each warpgroup TMA-loads its residual tile into its output tile's shared memory as the tile
  starts, and the epilogue reads it back (TMA-stored outputs only: the register-store epilogue
  with residual loads from global memory spilled, ptxas at 160 registers).

Why this shape (bench/RESULTS.md, session 5, has the measurements): at 128 x 128 tiles the int8
GEMM is bound by L2 -> SM bandwidth (ncu: L2 76-79% busy, tensor pipe 56%), so the tile must grow;
with an int32 MMA tile and an fp32 accumulator per output, three 64 x 128 warpgroups (160
registers each) are what the register file holds. Each warpgroup keeps one MMA in flight and
waits for it within the same loop trip: an in-flight result carried into the next trip makes
ptxas serialise every wgmma (its C7514 warning). At this shape ncu shows no unit saturated
(tensor pipe 63%, L2 71%, issue 52%; session 14): latency, not L2, is what is left, so these were
slower: TMA multicast over a 2-CTA cluster (its stage release needs a cluster-wide barrier),
the integer-add conversion instead of I2FP, and two half-width MMAs per K tile. A 128-row tile
(two warpgroups of 232 registers) lost by 6-9% even with two MMAs in flight per warpgroup, and
so did writing the FFN hidden state's int8 codes from its epilogue (session 15).

Gluon has no CPU interpreter: tests/gpu runs it against the reference and the Triton kernel;
tests/kernels compiles it for sm90 on the CPU (ptxas) and checks wgmma is not serialised.
"""
from __future__ import annotations

import functools

import torch
import triton

from . import sla_triton

try:  # triton >= 3.5 (the API used here is the same in 3.6 and 3.8)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
except Exception:  # pragma: no cover - older triton: the Triton kernel only
    AVAILABLE = False

CONSUMERS = 3  # warpgroups of 64 rows: the tile is 192 x 128
BLOCK_M = 64 * CONSUMERS
BLOCK_N = 128


def usable(device: torch.device) -> bool:
    """Gluon importable and an sm90 GPU (wgmma is sm90-only: not sm8x, not sm100/sm120)."""
    return AVAILABLE and device.type == "cuda" and sla_triton.capability(device) == (9, 0)


if AVAILABLE:
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _CONSUMERS = gl.constexpr(CONSUMERS)

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        """Grouped order: GROUP_M row tiles share the same W column tiles in L2."""
        group = GROUP_M * num_n
        first_m = (tile // group) * GROUP_M
        gsize = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % gsize, (tile % group) // gsize

    @gluon.jit
    def _producer(a_desc, w_desc, a_smem, w_smem, ready, empty, M, N, KT,
                  GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        C: gl.constexpr = a_smem.type.shape[0] // STAGES
        num_m = gl.cdiv(M, 64 * C)
        num_n = gl.cdiv(N, w_desc.block_type.shape[0])
        g = 0  # K tiles loaded so far: stage g % STAGES, its use (g // STAGES) & 1
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pm, pn = _tile_coords(tile, num_m, num_n, GROUP_M)
            for kt in range(KT):
                s = g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
                bar = ready.index(s)
                mbarrier.expect(bar, C * a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                for h in gl.static_range(C):  # zero-filled outside [M, K]
                    _tma_load(a_desc, [pm * (64 * C) + 64 * h, kt * 128], bar, a_smem.index(C * s + h))
                _tma_load(w_desc, [pn * w_desc.block_type.shape[0], kt * 128], bar, w_smem.index(s))
                g += 1

    @gluon.jit
    def _consumer(a_smem, w_smem, ready, empty, AS, WS, BIAS, Y, y_desc, c_smem, r_desc, G, res_bar, M, N, KT,
                  H: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                  TMA_STORE: gl.constexpr, HAS_RES: gl.constexpr, HAS_GATE: gl.constexpr):
        """Warpgroup H: rows 64H..64H+63 of each tile."""
        C: gl.constexpr = a_smem.type.shape[0] // STAGES
        BN: gl.constexpr = w_smem.type.shape[1]
        # wgmma atom m16 x BN x k32 (int8) on 4 warps: one instruction covers 64 x BN
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 32])
        zero = gl.zeros([64, BN], gl.int32, layout)
        num_m = gl.cdiv(M, 64 * C)
        num_n = gl.cdiv(N, BN)
        g = 0
        done = 0  # tiles finished by this program: the residual barrier's phase
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pm, pn = _tile_coords(tile, num_m, num_n, GROUP_M)
            off_m = pm * (64 * C) + 64 * H
            off_n = pn * BN
            if HAS_RES:  # the residual tile comes in (into c_smem) while the K loop runs
                tma.store_wait(0)  # this warpgroup's previous tile has left c_smem
                mbarrier.expect(res_bar.index(H), r_desc.block_type.nbytes)
                _tma_load(r_desc, [off_m, off_n], res_bar.index(H), c_smem.index(H))
            # 64 rows and BN <= 128 columns lie inside one 128 x 128 scale tile: s_x * s_w is one
            # scalar per K tile (rows past M, whose outputs are not stored, read the last row's)
            sa_ptr = AS + gl.minimum(off_m // 128, (M - 1) // 128) * KT
            sw_ptr = WS + (off_n // 128) * KT
            acc = gl.zeros([64, BN], gl.float32, layout)
            for kt in range(KT):
                s = g % STAGES
                mbarrier.wait(ready.index(s), (g // STAGES) & 1)
                tok = warpgroup_mma(a_smem.index(C * s + H), w_smem.index(s).permute((1, 0)), zero,
                                    use_acc=False, is_async=True)
                sc = gl.load(sa_ptr + kt) * gl.load(sw_ptr + kt)  # while the MMA runs
                part = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                mbarrier.arrive(empty.index(s), count=1)
                acc = gl.fma(part.to(gl.float32), sc, acc)  # |part| <= 2^21: exact I2F, then one rounding
                g += 1

            # epilogue: cast to the output dtype first, then + bias in it (the reference's order)
            offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
            y = acc.to(Y.dtype.element_ty)
            if HAS_BIAS:
                bias = gl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
                y = (y.to(gl.float32) + bias[None, :]).to(Y.dtype.element_ty)
            if HAS_RES:  # r + y * gate.to(dtype), each op rounded to dtype (w8a8_triton._residual)
                mbarrier.wait(res_bar.index(H), done & 1)
                r = c_smem.index(H).load(layout)  # each warp reads (then writes) only its own 16 rows
                yf = y.to(gl.float32)
                if HAS_GATE:
                    gate = gl.load(G + offs_n, mask=offs_n < N, other=0.0).to(Y.dtype.element_ty).to(gl.float32)
                    yf = (yf * gate[None, :]).to(Y.dtype.element_ty).to(gl.float32)
                y = (r.to(gl.float32) + yf).to(Y.dtype.element_ty)
            done += 1
            if TMA_STORE:  # through shared memory, the store left to the TMA unit (clipped at M, N)
                tma.store_wait(0)  # this warpgroup's previous tile has left c_smem
                c_smem.index(H).store(y)
                fence_async_shared()
                _tma_store(y_desc, [off_m, off_n], c_smem.index(H))
            else:
                offs_m = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
                gl.store(Y + offs_m[:, None].to(gl.int64) * N + offs_n[None, :], y,
                         mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
        if TMA_STORE:
            tma.store_wait(0)

    @gluon.jit(do_not_specialize=["M"])
    def _w8a8_gemm_kernel(a_desc, w_desc, y_desc, r_desc, AS, WS, BIAS, G, Y, M, N, KT,
                          HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, TMA_STORE: gl.constexpr, HAS_RES: gl.constexpr,
                          HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(TMA_STORE or not HAS_RES, "a residual comes in by TMA, with the TMA-stored outputs")
        a_smem = gl.allocate_shared_memory(gl.int8, [_CONSUMERS * STAGES, 64, 128], a_desc.layout)
        if TMA_STORE:  # one output tile per consumer warpgroup
            c_smem = gl.allocate_shared_memory(y_desc.dtype, [_CONSUMERS] + y_desc.block_type.shape, y_desc.layout)
        else:
            c_smem = a_smem  # unused
        w_smem = gl.allocate_shared_memory(gl.int8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        res_bar = gl.allocate_shared_memory(gl.int64, [_CONSUMERS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=_CONSUMERS)  # one arrive per consumer warpgroup
        for h in gl.static_range(_CONSUMERS):
            mbarrier.init(res_bar.index(h), count=1)
        # the default partition (num_warps = 4) is consumer 0; workers: consumers 1, 2, the producer
        gl.warp_specialize([
            (_consumer, (a_smem, w_smem, ready, empty, AS, WS, BIAS, Y, y_desc, c_smem, r_desc, G, res_bar,
                         M, N, KT, 0, GROUP_M, STAGES, HAS_BIAS, TMA_STORE, HAS_RES, HAS_GATE)),
            (_consumer, (a_smem, w_smem, ready, empty, AS, WS, BIAS, Y, y_desc, c_smem, r_desc, G, res_bar,
                         M, N, KT, 1, GROUP_M, STAGES, HAS_BIAS, TMA_STORE, HAS_RES, HAS_GATE)),
            (_consumer, (a_smem, w_smem, ready, empty, AS, WS, BIAS, Y, y_desc, c_smem, r_desc, G, res_bar,
                         M, N, KT, 2, GROUP_M, STAGES, HAS_BIAS, TMA_STORE, HAS_RES, HAS_GATE)),
            (_producer, (a_desc, w_desc, a_smem, w_smem, ready, empty, M, N, KT, GROUP_M, STAGES)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])


# Autotuner candidates (w8a8_triton.w8a8_gemm), marked GLUON. 16 warps (the producer's warpgroup
# is padded to 4) at maxnreg 128 = the whole register file; setmaxnreg moves the producer's share
# to the consumers (160 each; the default partition gets the rest, 168). H100 (triton 3.6), GEMM ms
# with bias (one sweep; the best per shape moves between runs by 2-3%) at M = 32760 for (K,N) =
# (1536,1536) (1536,8960) (8960,1536) (5120,13824), then the 14B FFN passes (16384 rows)
# (5120,13824) (13824,5120) and the 14B attention linears (75600 rows, 5120 x 5120):
#   GROUP_M 4, 4 stages (160 KB + 48 KB of output tiles)  0.142 0.897 0.810 4.185 | 2.134 2.138 3.606
#   GROUP_M 8, 4 stages                                   0.144 0.886 0.816 4.193 | 2.124 2.134 3.613
#   GROUP_M 16, 4 stages                                  0.147 0.880 0.836 4.362 | 2.084 2.238 3.683
#   GROUP_M 4, 3 stages                                   0.145 0.885 0.817 4.303 | 2.180 2.247 3.703
# Stores from registers instead of by TMA (fp32 outputs; rows not 16-byte aligned), GROUP_M 4:
# 0.196 1.090 0.861 4.591 | 2.294 2.235 3.923 (5 stages: 0.195 1.068 0.863 4.467).
CONFIGS = [
    dict(GLUON=True, GROUP_M=g, STAGES=s, CONSUMER_REGS=160, maxnreg=128, num_warps=4)
    for g, s in ((4, 4), (8, 4), (16, 4), (4, 3))
]


def _tma_store_ok(y) -> bool:
    """The output can take TMA stores: 16-bit, contiguous, 16-byte aligned rows."""
    return (y.dtype in (torch.bfloat16, torch.float16) and y.is_contiguous() and y.data_ptr() % 16 == 0
            and (y.shape[1] * y.element_size()) % 16 == 0)


def residual_ok(y, residual) -> bool:
    """This kernel can add `residual` in its epilogue: both TMA-storable (the residual tile is
    TMA-loaded into the output tile's shared memory; from registers it spilled)."""
    return _tma_store_ok(y) and _tma_store_ok(residual)


def descriptors(xq, wq, y=None, residual=None):
    """TMA descriptors of int8 xq [M, K] (64-row slices), wq [N, K] (BLOCK_N-row tiles), of the
    output y [M, N] (64 x BLOCK_N tiles) and of the residual (the same tiles), or None for y
    (and the residual) when TMA cannot store y."""
    a_desc = TensorDescriptor.from_tensor(xq, [64, 128], _layout(64, 128, torch.int8))
    w_desc = TensorDescriptor.from_tensor(wq, [BLOCK_N, 128], _layout(BLOCK_N, 128, torch.int8))
    y_desc = r_desc = None
    if y is not None and _tma_store_ok(y) and (residual is None or _tma_store_ok(residual)):
        y_desc = TensorDescriptor.from_tensor(y, [64, BLOCK_N], _layout(64, BLOCK_N, y.dtype))
        if residual is not None:
            r_desc = TensorDescriptor.from_tensor(residual, [64, BLOCK_N], _layout(64, BLOCK_N, y.dtype))
    return a_desc, w_desc, y_desc, r_desc


@functools.lru_cache(maxsize=None)
def _layout(rows: int, cols: int, dtype: torch.dtype):
    """The NVMMA shared layout of a TMA tile (built once: a launch-time cost otherwise)."""
    gdt = {torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)


def gemm_into(y, xq, xs, wq, ws, bias, cfg, residual=None, gate=None) -> None:
    """y[M,N] = W8A8 GEMM of contiguous int8 xq [M,K] and wq [N,K] (K a multiple of 16: TMA rows);
    with `residual` [M,N] (and `gate` [N] fp32): residual + product * gate.to(y.dtype)."""
    cfg = {k: v for k, v in cfg.items() if k != "GLUON"}
    m, k = xq.shape
    n = wq.shape[0]
    a_desc, w_desc, y_desc, r_desc = descriptors(xq, wq, y, residual)
    if residual is not None and r_desc is None:
        raise ValueError("the Gluon W8A8 GEMM adds a residual only to outputs TMA can store (`residual_ok`)")
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    grid = (min(tiles, sla_triton.sm_count(xq.device)),)
    # a_desc / y: placeholders for what this launch does not read (None costs the launch less)
    _w8a8_gemm_kernel[grid](a_desc, w_desc, y_desc or a_desc, r_desc, xs, ws, y if bias is None else bias,
                            gate, y, m, n, triton.cdiv(k, 128),
                            HAS_BIAS=bias is not None, TMA_STORE=y_desc is not None, HAS_RES=residual is not None,
                            HAS_GATE=gate is not None, enable_fp_fusion=False, **cfg)
