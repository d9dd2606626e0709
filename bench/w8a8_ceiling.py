"""Experiment: is the exact W8A8 GEMM limited by Triton's int32-wgmma serialisation or by the rescale?

  python bench/w8a8_ceiling.py        (sm90 GPU, triton >= 3.5 with Gluon)

A Hopper W8A8 GEMM written in Gluon (triton.experimental.gluon), not used by the pack: each program
issues MMA(k+1), waits for MMA(k) only (`warpgroup_mma_wait(num_outstanding=1)`), refills that stage by
TMA and rescales tile k on the CUDA cores while MMA(k+1) runs, with the reference's exact per-tile
formula acc = acc + float(int32 tile) * (s_x * s_w) (no FMA). Two K tiles per loop trip keep the in-flight
accumulator in fixed registers (a loop-carried copy of an in-flight wgmma result makes ptxas serialise
every wgmma) and scales are loaded one retire ahead.

Times at M = 32760 for the DiT's (K, N): bf16 cuBLAS, torch._int_mm (cuBLAS int8, no scales), the pack's
Triton GEMM, this Gluon GEMM (checked bit-identical to the Triton one) and the same Gluon pipeline with
RESCALE=False (the MMA pipeline alone; its result is wrong, only its time matters). Results and the
conclusion are in bench/RESULTS.md (2026-11-23, session 2).
"""
from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except Exception:
    HAVE_GLUON = False

if HAVE_GLUON:

    @gluon.jit
    def _i32_to_f32(x):
        # exact int32 -> fp32 for |x| < 2^22 (tile sums stay below 2^21) by the integer-add trick (the pack now uses I2F)
        return (x + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0

    @gluon.jit
    def _load_tile(a_desc, w_desc, a_smem, w_smem, ready, kt, off_m, off_n, STAGES: gl.constexpr):
        s = kt % STAGES
        mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, kt * 128], ready.index(s), a_smem.index(s))
        tma.async_copy_global_to_shared(w_desc, [off_n, kt * 128], ready.index(s), w_smem.index(s))

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
    def _retire(tok, acc, sc, kt, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES: gl.constexpr,
                RESCALE: gl.constexpr):
        """Wait for MMA(kt) (the one issued after it may still run), refill its stage with
        tile kt+STAGES, and add its int32 tile times its scale sc to the fp32 accumulator."""
        d = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
        if kt + STAGES < KT:
            _load_tile(a_desc, w_desc, a_smem, w_smem, ready, kt + STAGES, off_m, off_n, STAGES)
        if RESCALE:
            return acc + _i32_to_f32(d) * sc
        return acc  # ceiling run: the MMA pipeline alone (wrong result)

    @gluon.jit(do_not_specialize=["M"])
    def _w8a8_gemm_gluon(a_desc, w_desc, AS, WS, BIAS, Y, M, N, KT,
                         HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                         RESCALE: gl.constexpr, num_warps: gl.constexpr):
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
        # Two K tiles per trip (slots A and B), so the in-flight accumulator of the next trip
        # is always the same registers: a loop-carried copy of an in-flight wgmma result makes
        # ptxas serialise every wgmma ("non wgmma instructions reading accumulator registers").
        # Each tile's scale is loaded one retire ahead, off the rescale's critical path.
        s_a = _scale(sa_ptr, sw_ptr, 0, KT)
        s_b = _scale(sa_ptr, sw_ptr, 1, KT)
        prev = _issue_mma(a_smem, w_smem, ready, zero, 0, STAGES)  # slot A: tile kt-1
        for kt in range(1, KT - 1, 2):
            cur = _issue_mma(a_smem, w_smem, ready, zero, kt, STAGES)  # slot B: tile kt
            acc = _retire(prev, acc, s_a, kt - 1, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES, RESCALE)
            s_a = _scale(sa_ptr, sw_ptr, kt + 1, KT)
            prev = _issue_mma(a_smem, w_smem, ready, zero, kt + 1, STAGES)  # slot A: tile kt+1
            acc = _retire(cur, acc, s_b, kt, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES, RESCALE)
            s_b = _scale(sa_ptr, sw_ptr, kt + 2, KT)
        if KT % 2 == 0:  # one tile left after the pairs (waited on directly: no copy of it)
            cur = _issue_mma(a_smem, w_smem, ready, zero, KT - 1, STAGES)
            acc = _retire(prev, acc, s_a, KT - 2, KT, a_desc, w_desc, a_smem, w_smem, ready, off_m, off_n, STAGES, RESCALE)
            last = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))
            acc = acc + _i32_to_f32(last) * s_b
        else:
            last = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            acc = acc + _i32_to_f32(last) * s_a
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



CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=8),
    dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=4),
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, STAGES=3, num_warps=8),
    dict(BLOCK_M=128, BLOCK_N=64, GROUP_M=8, STAGES=4, num_warps=8),
]


def gluon_gemm(xq, xs, wq, ws, cfg, rescale=True, out_dtype=torch.bfloat16):
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    cfg = dict(cfg)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    a_desc = TensorDescriptor.from_tensor(xq, [bm, 128], gl.NVMMASharedLayout.get_default_for([bm, 128], gl.int8))
    w_desc = TensorDescriptor.from_tensor(wq, [bn, 128], gl.NVMMASharedLayout.get_default_for([bn, 128], gl.int8))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_gemm_gluon[grid](a_desc, w_desc, xs, ws, y, y, m, n, triton.cdiv(k, 128), HAS_BIAS=False,
                           RESCALE=rescale, enable_fp_fusion=False, **cfg)
    return y


def main():
    if not (HAVE_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        sys.exit("needs an sm90 GPU and triton with Gluon")
    from triton.testing import do_bench

    from turbo_core.kernels import w8a8_triton
    from turbo_core.quant.int8 import quantize_int8

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    m = 32760
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; ms (TOPS)")
    for kd, nd in [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 13824)]:
        x = torch.randn(m, kd, device="cuda", dtype=torch.bfloat16)
        wf = torch.randn(nd, kd, device="cuda", dtype=torch.bfloat16)
        qw, sw = quantize_int8(wf)
        xq, xs = w8a8_triton.quantize_act(x)
        ref = w8a8_triton.w8a8_gemm(xq, xs, qw, sw)
        res = {"bf16 cuBLAS": ms(lambda: torch.nn.functional.linear(x, wf)),
               "torch._int_mm": ms(lambda: torch._int_mm(xq, qw.t())),
               "Triton exact": ms(lambda: w8a8_triton.w8a8_gemm(xq, xs, qw, sw))}
        exact = []
        for i, c in enumerate(CONFIGS):
            exact.append(bool(torch.equal(gluon_gemm(xq, xs, qw, sw, c), ref)))
            res[f"Gluon exact cfg{i}"] = ms(lambda: gluon_gemm(xq, xs, qw, sw, c))
            res[f"Gluon no-rescale cfg{i}"] = ms(lambda: gluon_gemm(xq, xs, qw, sw, c, rescale=False))
        flops = 2 * m * kd * nd
        print(f"K={kd} N={nd}: Gluon bit-identical to Triton on every config: {all(exact)}")
        for name, t in res.items():
            print(f"  {name:24s} {t:7.3f} ms  ({flops / t / 1e9:6.0f})")


if __name__ == "__main__":
    main()
