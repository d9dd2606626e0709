"""Triton kernel micro-benchmarks on one GPU (written for an H100), with GPU correctness checks first.

  python bench/bench_kernels.py [--only attn|w8a8] [--skip-14b] [--no-autotune] [--rep 100]

(a) self-attention 1.3B-480p: B=1, L=32760, H=12, D=128, topk 0.1
(b) self-attention 14B-720p:  B=1, L=75600, H=40, D=128, topk 0.1
    torch SDPA (default, and FLASH / CUDNN / EFFICIENT where selectable), our SLA
    Triton (full forward = block map + linear-branch state + fused kernel; and the
    parts), our SageSLA-class (int8 QK + fp8 V, and int8 QK + bf16 V).
(c) W8A8 linear at M=32760, (K,N) in (1536,1536) (1536,8960) (8960,1536) (5120,13824):
    activation quant + int8 GEMM (exact and FMA-fused variants, and each part) vs
    bf16 F.linear (cuBLAS); plus bf16 cuBLAS TFLOP/s at 8192^3.

Times are medians of triton.testing.do_bench (warmup/rep in ms). A function whose
first run takes more than 150 ms (dense SDPA at 14B) is timed as the median of 3
CUDA-event-timed runs instead, to keep the script under ~4 minutes.
TFLOP/s: dense attention 4*H*L^2*D; sparse attention 4*H*L*(kk*64)*D (the work
on the kept blocks); linear 2*M*N*K.

Prints a markdown table at the end; writes $OUT/bench_kernels.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T0 = time.time()
DEV = "cuda"  # "cpu" only with --smoke (TRITON_INTERPRET=1, tiny shapes: checks the script, not the speed)
RESULTS: list[dict] = []
CHECKS: dict = {}
INFO: dict = {}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def dump() -> None:
    """Write what we have so far (also called after each section)."""
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_kernels.json"), "w") as f:
        json.dump(dict(info=INFO, checks=CHECKS, results=RESULTS), f, indent=1, default=str)


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def bench_ms(fn, rep: int) -> float:
    if DEV == "cpu":  # --smoke
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    fn()  # compile / autotune / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first > 150:
        times = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    try:
        return float(do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(do_bench(fn, warmup=max(10, rep // 4), rep=rep, quantiles=[0.5]))


def record(case, impl, ms, flops=None, baseline_ms=None, **extra):
    row = dict(case=case, impl=impl, ms=round(ms, 4))
    if flops:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    if baseline_ms:
        row["speedup"] = round(baseline_ms / ms, 2)
    row.update(extra)
    RESULTS.append(row)
    log(f"{case:28s} {impl:34s} {ms:9.3f} ms" + (f"  {row['tflops']:7.1f} TFLOP/s" if flops else "")
        + (f"  x{row['speedup']}" if baseline_ms else ""))
    return ms


# ----------------------------------------------------------------------------- attention

def sdpa_backends():
    """[(name, context-manager factory or None)] for the selectable SDPA backends."""
    out = [("sdpa default", None)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        if hasattr(SDPBackend, name):
            out.append((f"sdpa {name.split('_')[0].lower()}", lambda b=getattr(SDPBackend, name): sdpa_kernel([b])))
    return out


def attention_case(name, n, h, topk, rep, big):
    from turbo_core.attention.sla_reference import block_map, sla_attention, topk_count
    from turbo_core.kernels import sagesla_triton, sla_triton

    d = 128
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    w = (torch.randn(d, d, device=DEV, generator=g) / math.sqrt(d)).to(torch.bfloat16)
    b = (0.1 * torch.randn(d, device=DEV, generator=g)).to(torch.bfloat16)
    nk = -(-n // 64)
    kk = topk_count(nk, topk)
    case = f"{name} L={n} H={h}"

    # ---- correctness on 2 heads (heads are independent), full L
    hs = slice(0, 2)
    qs, ks_, vs = (t[:, :, hs] for t in (q, k, v))
    lut = sla_triton.block_lut(qs, ks_, topk)
    smap, _ = block_map(qs.transpose(1, 2), ks_.transpose(1, 2), topk)
    mine = sla_triton.lut_to_map(lut, nk)
    ref = sla_attention(qs, ks_, vs, w, b, topk=topk)
    out = sla_triton.sla_forward(qs, ks_, vs, w, b, topk)
    s8 = sagesla_triton.sagesla_forward(qs, ks_, vs, w, b, topk, v_fp8=True)
    s16 = sagesla_triton.sagesla_forward(qs, ks_, vs, w, b, topk, v_fp8=False)
    # sparse branch alone vs fp32 attention over the same blocks (first 4 query blocks)
    o_sparse = sla_triton.attention_launch(qs, ks_, vs, lut)
    o_sage = sagesla_triton.sagesla_forward(qs, ks_, vs, None, None, topk, v_fp8=True)
    rows = min(n, 4 * 128)
    dense_sel = _dense_on_selection(qs[:, :rows], ks_, vs, lut[:, :, :4])
    CHECKS[case] = dict(
        kk=kk,
        map_mismatched_blocks=int((mine != smap).sum()), map_blocks=int(smap.numel()),
        sla_vs_reference_rel_l2=rel_l2(out, ref), sla_vs_reference_max_abs=max_abs(out, ref),
        sla_sparse_vs_fp32_on_selection_rel_l2=rel_l2(o_sparse[:, :rows], dense_sel),
        sage_fp8v_sparse_vs_fp32_on_selection_rel_l2=rel_l2(o_sage[:, :rows], dense_sel),
        sagesla_fp8v_vs_sla_rel_l2=rel_l2(s8, out), sagesla_bf16v_vs_sla_rel_l2=rel_l2(s16, out),
    )
    log(f"check {case}: {CHECKS[case]}")
    del ref, out, s8, s16, o_sparse, o_sage, dense_sel
    torch.cuda.empty_cache()

    # ---- timing, all heads
    dense_flops = 4 * h * n * n * d
    sparse_flops = 4 * h * n * kk * 64 * d
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # what the DiT's dense path passes to SDPA
    base = None
    for label, ctx in sdpa_backends():
        if big and label == "sdpa efficient":
            continue  # ~2 s a call at 14B; flash/cuDNN are the relevant baselines
        def run(ctx=ctx):
            if ctx is None:
                return F.scaled_dot_product_attention(qt, kt, vt)
            with ctx():
                return F.scaled_dot_product_attention(qt, kt, vt)
        try:
            ms = bench_ms(run, rep)
        except Exception as exc:  # backend not available for these inputs
            log(f"{case}: {label} unavailable ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        record(case, label, ms, dense_flops)
        if base is None:
            base = ms
    torch.cuda.empty_cache()

    lut = sla_triton.block_lut(q, k, topk)
    state = sla_triton.linear_state(k, v)
    runs = [
        ("SLA triton (full, proj_l)", lambda: sla_triton.sla_forward(q, k, v, w, b, topk)),
        ("  block map (pool+topk)", lambda: sla_triton.block_lut(q, k, topk)),
        ("  linear state phi(k)^T v", lambda: sla_triton.linear_state(k, v)),
        ("  attn kernel + linear epilogue", lambda: sla_triton.attention_launch(q, k, v, lut, proj_w=w, proj_b=b,
                                                                               linear=state)),
        ("  attn kernel, sparse only", lambda: sla_triton.attention_launch(q, k, v, lut)),
        ("SageSLA int8 QK + fp8 V (full)", lambda: sagesla_triton.sagesla_forward(q, k, v, w, b, topk, v_fp8=True)),
        ("SageSLA int8 QK + bf16 V (full)", lambda: sagesla_triton.sagesla_forward(q, k, v, w, b, topk,
                                                                                     v_fp8=False)),
    ]
    for label, fn in runs:
        flops = sparse_flops if ("kernel" in label or "full" in label) else None
        ms = bench_ms(fn, rep)
        record(case, label, ms, flops, base if "full" in label else None)
    INFO.setdefault("tuned_attention", {}).update({str(key): cfg for key, cfg in sla_triton._tuned.items()})
    del q, k, v, qt, kt, vt, lut, state
    torch.cuda.empty_cache()


def _dense_on_selection(q, k, v, lut, blkq=128, blkk=64):
    """fp32 softmax attention of q's rows over the key blocks in lut (q starts at row 0)."""
    n = k.shape[1]
    from turbo_core.kernels.sla_triton import lut_to_map

    smap = lut_to_map(lut, -(-n // blkk)).bool()
    allowed = smap.repeat_interleave(blkq, 2)[:, :, :q.shape[1]].repeat_interleave(blkk, 3)[..., :n]
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ vf).transpose(1, 2)


# ----------------------------------------------------------------------------- W8A8

def w8a8_case(m, kdim, n, rep):
    from turbo_core.kernels import w8a8_triton
    from turbo_core.quant.int8 import quantize_int8, w8a8_linear_reference

    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(m, kdim, device=DEV, generator=g).to(torch.bfloat16)
    wf = (torch.randn(n, kdim, device=DEV, generator=g) / math.sqrt(kdim)).to(torch.bfloat16)
    bias = (0.1 * torch.randn(n, device=DEV, generator=g)).to(torch.bfloat16)
    qw, sw = quantize_int8(wf)
    case = f"W8A8 M={m} K={kdim} N={n}"
    exact, fast = w8a8_triton.W8A8Kernel(exact=True), w8a8_triton.W8A8Kernel(exact=False)

    # ---- correctness (rows slice for the reference; quantisation on everything)
    xq, xs = w8a8_triton.quantize_act(x)
    rq, rs = quantize_int8(x)
    xsl = x[:1024]
    ref = w8a8_linear_reference(xsl, qw, sw, bias)
    ye, yf = exact(xsl, qw, sw, bias), fast(xsl, qw, sw, bias)

    def ulp(a, b):  # max |a-b| in units of b's bf16 ulp
        step = torch.exp2(torch.floor(torch.log2(b.float().abs().clamp_min(1e-30))) - 7)
        return float(((a.float() - b.float()).abs() / step).max())

    CHECKS[case] = dict(
        quant_codes_equal=bool(torch.equal(xq, rq)), quant_scales_equal=bool(torch.equal(xs, rs)),
        gemm_exact_mismatches=int((ye != ref).sum()), gemm_exact_max_ulp=ulp(ye, ref),
        gemm_fast_mismatches=int((yf != ref).sum()), gemm_fast_max_ulp=ulp(yf, ref),
        vs_dense_bf16_rel_l2=rel_l2(ye, F.linear(xsl, wf, bias)),
    )
    log(f"check {case}: {CHECKS[case]}")

    flops = 2 * m * n * kdim
    base = record(case, "bf16 F.linear (cuBLAS)", bench_ms(lambda: F.linear(x, wf, bias), rep), flops)
    record(case, "W8A8 triton (quant+gemm, exact)", bench_ms(lambda: exact(x, qw, sw, bias), rep), flops, base)
    record(case, "W8A8 triton (quant+gemm, fma)", bench_ms(lambda: fast(x, qw, sw, bias), rep), flops, base)
    record(case, "  activation quant only", bench_ms(lambda: w8a8_triton.quantize_act(x), rep))
    record(case, "  int8 gemm only (exact)", bench_ms(lambda: w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias), rep),
           flops)
    INFO.setdefault("tuned_gemm", {}).update({str(key): cfg for key, cfg in w8a8_triton._tuned.items()})
    del x, wf, xq, xs, rq, rs
    torch.cuda.empty_cache()


def cublas_peak(rep):
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    record("bf16 matmul 8192^3", "torch.mm (cuBLAS)", bench_ms(lambda: a @ bm, rep), 2 * 8192 ** 3)


# ----------------------------------------------------------------------------- main

def table() -> str:
    lines = ["| case | implementation | ms | TFLOP/s | speedup |", "|---|---|---:|---:|---:|"]
    for r in RESULTS:
        lines.append(f"| {r['case']} | {r['impl'].strip()}{' (part)' if r['impl'].startswith('  ') else ''} | "
                     f"{r['ms']:.3f} | {r.get('tflops', '')} | {('x' + str(r['speedup'])) if 'speedup' in r else ''} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["attn", "w8a8"])
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--no-autotune", action="store_true", help="use the first config of each kernel")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU interpreter, tiny shapes
    args = ap.parse_args()
    global DEV
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
    if args.no_autotune:
        os.environ["TURBO_KERNELS_AUTOTUNE"] = "0"
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the W8A8 reference's fp32 matmul must stay exact
    torch.backends.cudnn.allow_tf32 = False
    import triton

    from turbo_core import kernels

    INFO.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
                capability=torch.cuda.get_device_capability() if DEV == "cuda" else None,
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                kernels_installed=kernels.install(), topk=args.topk, rep_ms=args.rep)
    log(f"{INFO}")
    try:
        small = 16 if args.smoke else 1  # --smoke: divide the sizes
        if args.only in (None, "attn"):
            attention_case("1.3B-480p", 32760 // small // 4 if small > 1 else 32760, 12 // small or 2, args.topk,
                           args.rep, big=False)
            dump()
            if not args.skip_14b:
                attention_case("14B-720p", 75600 // small // 4 if small > 1 else 75600, 40 // small or 2,
                               args.topk, args.rep, big=True)
                dump()
        if args.only in (None, "w8a8"):
            for kdim, n in [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 13824)]:
                w8a8_case(32760 // small, kdim // small, n // small, args.rep)
                dump()
            if not args.smoke:
                cublas_peak(args.rep)
    finally:
        INFO["elapsed_s"] = round(time.time() - T0, 1)
        dump()
        print("\n## correctness checks (GPU)\n")
        for case, c in CHECKS.items():
            print(f"* {case}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in c.items()))
        print("\n## timings\n")
        print(table())
        print(f"\n{INFO.get('device')} torch {INFO.get('torch')} triton {INFO.get('triton')}, "
              f"elapsed {INFO['elapsed_s']} s")


if __name__ == "__main__":
    main()
