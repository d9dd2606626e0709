"""The W8A8 int8 GEMM for sm90 (H100/H200/H20) in Gluon, with the MMA of the next K tile in flight
while the previous one is rescaled.

Same arithmetic as `w8a8_triton._w8a8_gemm_kernel`, bit for bit: per 128-wide K tile, in order,
acc = fma(float(int32 tile), s_x * s_w, acc) in fp32; then cast to the output dtype, then + bias in
it. `w8a8_triton.w8a8_gemm` adds `CONFIGS` to its autotuner on sm90, so each GEMM shape runs
whichever kernel is faster there; a config that fails to build (another triton's Gluon) is skipped
by the autotuner and the Triton kernel stays.

Why Gluon: triton waits for an int32-accumulating wgmma right after issuing it, so a Triton
program cannot overlap a tile's rescale (on the CUDA cores) with the next tile's MMA (on the tensor
cores). Here each program issues MMA(k+1), waits for MMA(k) only (`warpgroup_mma_wait(1)`), refills
that stage by TMA and rescales tile k while MMA(k+1) runs. Two K tiles per loop trip keep the
in-flight accumulator in fixed registers: a loop-carried copy of an in-flight wgmma result makes
ptxas serialise every wgmma. Each tile's scale is loaded one retire ahead. (bench/RESULTS.md,
sessions 2-4, has the measurements: the same pipeline without the rescale is the ceiling.)

Gluon has no CPU interpreter: tests/gpu checks it against the reference and the Triton kernel.
"""
from __future__ import annotations

import torch
import triton

try:  # triton >= 3.5 (the API used here is the same in 3.6 and 3.8)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
except Exception:  # pragma: no cover - older triton: the Triton kernel only
    AVAILABLE = False


def usable(device: torch.device) -> bool:
    """Gluon importable and an sm90 GPU (wgmma is sm90-only: not sm8x, not sm100/sm120)."""
    return AVAILABLE and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


if AVAILABLE:
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _load_tile(a_desc, w_desc, a_smem, w_smem, ready, kt, off_m, off_n, STAGES: gl.constexpr):
        s = kt % STAGES
        mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
        _tma_load(a_desc, [off_m, kt * 128], ready.index(s), a_smem.index(s))  # zero-filled outside
        _tma_load(w_desc, [off_n, kt * 128], ready.index(s), w_smem.index(s))

    @gluon.jit
    def _issue_mma(a_smem, w_smem, ready, zero, kt, STAGES: gl.constexpr):
        s = kt % STAGES
        mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
        return warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _scale(sa_ptr, sw_ptr, kt, KT):
        """s_x * s_w of K tile kt (clamped to the last tile: prefetches past the end are unused)."""
        k = gl.minimum(kt, KT - 1)
        return gl.load(sa_ptr + k) * gl.load(sw_ptr + k)

    @gluon.jit
    def _add_tile(acc, part, sc):
        return gl.fma(part.to(gl.float32), sc, acc)  # |part| <= 2^21: exact I2F, then one rounding

    @gluon.jit
    def _retire(tok, acc, sc, kt, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES: gl.constexpr):
        """Wait for MMA(kt) (the one issued after it may still run), refill its stage with
        tile kt+STAGES, and add its int32 tile times its scale sc to the fp32 accumulator."""
        d = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
        if kt + STAGES < KT:
            _load_tile(a_desc, w_desc, a_smem, w_smem, ready, kt + STAGES, off_m, off_n, STAGES)
        return _add_tile(acc, d, sc)

    @gluon.jit(do_not_specialize=["M"])
    def _w8a8_gemm_kernel(a_desc, w_desc, AS, WS, BIAS, Y, M, N, KT,
                          HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                          num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        # wgmma atom m16 x n x k32 (int8); warps stacked along M, one instruction covers BLOCK_N
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n  # GROUP_M row tiles share the same W column tiles in L2
        first_m = (pid // group) * GROUP_M
        gsize = gl.minimum(num_m - first_m, GROUP_M)
        pm = first_m + (pid % group) % gsize
        pn = (pid % group) // gsize
        off_m = pm * BLOCK_M
        off_n = pn * BLOCK_N
        # BLOCK_M, BLOCK_N <= 128 lie inside one 128x128 scale tile: s_x * s_w is one scalar per K tile
        sa_ptr = AS + (off_m // 128) * KT
        sw_ptr = WS + (off_n // 128) * KT

        a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, 128], a_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, 128], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        for s in gl.static_range(STAGES):
            if s < KT:
                _load_tile(a_desc, w_desc, a_smem, w_smem, ready, s, off_m, off_n, STAGES)

        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
        # slots A and B: two K tiles per trip, so the next trip's in-flight accumulator is the same registers
        s_a = _scale(sa_ptr, sw_ptr, 0, KT)
        s_b = _scale(sa_ptr, sw_ptr, 1, KT)
        prev = _issue_mma(a_smem, w_smem, ready, zero, 0, STAGES)  # slot A: tile kt-1
        for kt in range(1, KT - 1, 2):
            cur = _issue_mma(a_smem, w_smem, ready, zero, kt, STAGES)  # slot B: tile kt
            acc = _retire(prev, acc, s_a, kt - 1, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES)
            s_a = _scale(sa_ptr, sw_ptr, kt + 1, KT)
            prev = _issue_mma(a_smem, w_smem, ready, zero, kt + 1, STAGES)  # slot A: tile kt+1
            acc = _retire(cur, acc, s_b, kt, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES)
            s_b = _scale(sa_ptr, sw_ptr, kt + 2, KT)
        if KT % 2 == 0:  # one tile left after the pairs (waited on directly: no copy of it)
            cur = _issue_mma(a_smem, w_smem, ready, zero, KT - 1, STAGES)
            acc = _retire(prev, acc, s_a, KT - 2, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES)
            acc = _add_tile(acc, warpgroup_mma_wait(num_outstanding=0, deps=(cur,)), s_b)
        else:
            acc = _add_tile(acc, warpgroup_mma_wait(num_outstanding=0, deps=(prev,)), s_a)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        # epilogue: cast to the output dtype first, then + bias in it (the reference's order)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        y = acc.to(Y.dtype.element_ty)
        if HAS_BIAS:
            bias = gl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            y = (y.to(gl.float32) + bias[None, :]).to(Y.dtype.element_ty)
        gl.store(Y + offs_m[:, None].to(gl.int64) * N + offs_n[None, :], y,
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# Autotuner candidates (w8a8_triton.w8a8_gemm), marked GLUON. 128x128 on 8 warps: one program per
# SM (its two int32 tiles and the fp32 tile take the registers), 64x128 on 4 warps: two.
CONFIGS = [
    dict(GLUON=True, BLOCK_M=128, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=8),
    dict(GLUON=True, BLOCK_M=64, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=4),
    dict(GLUON=True, BLOCK_M=128, BLOCK_N=64, GROUP_M=8, STAGES=4, num_warps=8),
]


def gemm_into(y, xq, xs, wq, ws, bias, cfg) -> None:
    """y[M,N] = W8A8 GEMM of contiguous int8 xq [M,K] and wq [N,K] (K a multiple of 16: TMA rows)."""
    cfg = {k: v for k, v in cfg.items() if k != "GLUON"}
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    m, k = xq.shape
    n = wq.shape[0]
    a_desc = TensorDescriptor.from_tensor(xq, [bm, 128], gl.NVMMASharedLayout.get_default_for([bm, 128], gl.int8))
    w_desc = TensorDescriptor.from_tensor(wq, [bn, 128], gl.NVMMASharedLayout.get_default_for([bn, 128], gl.int8))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_gemm_kernel[grid](a_desc, w_desc, xs, ws, y if bias is None else bias, y, m, n, triton.cdiv(k, 128),
                            HAS_BIAS=bias is not None, enable_fp_fusion=False, **cfg)
