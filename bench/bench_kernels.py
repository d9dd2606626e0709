"""Triton kernel micro-benchmarks on one GPU (written for an H100), with GPU correctness checks first.

  python bench/bench_kernels.py [--only attn|w8a8|ops] [--skip-14b] [--no-autotune] [--rep 100]

(a) self-attention 1.3B-480p: B=1, L=32760, H=12, D=128, topk 0.1
(b) self-attention 14B-720p:  B=1, L=75600, H=40, D=128, topk 0.1
    torch SDPA (default, and FLASH / CUDNN / EFFICIENT where selectable), our SLA
    Triton (full forward = block map + linear-branch state + fused kernel; and the
    parts), our SageSLA-class (int8 QK + fp8 V, and int8 QK + fp16 V).
(c) W8A8 linear at M=32760, (K,N) in (1536,1536) (1536,8960) (8960,1536) (5120,13824):
    activation quant + int8 GEMM (bit-exact; every config checked at full size; and each part) vs
    bf16 F.linear (cuBLAS), also both for 2 s back to back with the SM clock and power meanwhile
    (bench/gpu_power.py); plus bf16 cuBLAS TFLOP/s at 8192^3; and the FFN hidden state's GELU +
    quantisation in one pass vs torch's GELU then the quantisation (1.3B and 14B pass sizes).
(d) the DiT block's row-wise glue at 1.3B-480p (L=32760, D=1536) and 14B-720p (L=75600,
    D=5120): norm1 + AdaLN, gated residual + norm3, residual + norm2 + AdaLN, gated FFN
    residual, as the block's torch ops and as the fused Triton kernel (residual sums
    checked bit-exact, norms checked against torch on the GPU); a bf16 copy of x as the floor.

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
TUNING: list = []  # (case, kernel, [(config, autotune ms)])
NO_SDPA = False
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
    # back-to-back calls for ~1 s first, as in a generation (a case's first window measured up
    # to 12% slower once: SageSLA 14B 24.0 ms, then 21.6, 22.0; runs also differ by ~10%)
    for _ in range(min(2000, int(1000 / max(first, 0.01)))):
        fn()
    try:
        return float(do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(do_bench(fn, warmup=max(10, rep // 4), rep=rep, quantiles=[0.5]))


def sustained_ms(fn, call_ms: float, seconds: float = 2.0):
    """ms per call over `seconds` of back-to-back calls of `fn` (which takes about `call_ms`, as
    `bench_ms` measured it), and the GPU's SM clock / power meanwhile (do_bench's short windows can
    run at a clock the power cap does not allow for long)."""
    from gpu_power import PowerSampler

    n = max(3, int(seconds * 1e3 / max(call_ms, 1e-3)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with PowerSampler(torch.cuda.current_device()) as power:
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / n, power.summary()


def record(case, impl, ms, flops=None, baseline_ms=None, **extra):
    row = dict(case=case, impl=impl, ms=round(ms, 4))
    if flops:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    if baseline_ms:
        row["speedup"] = round(baseline_ms / ms, 2)
    row.update(extra)
    RESULTS.append(row)
    log(f"{case:28s} {impl:34s} {ms:9.3f} ms" + (f"  {row['tflops']:7.1f} TFLOP/s" if flops else "")
        + (f"  x{row['speedup']}" if baseline_ms else "") + (f"  {extra['power']}" if "power" in extra else ""))
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
    rows = min(n, 4 * 128)
    # every SLA config (explicitly: these compiles are the ones autotuning uses later)
    cfg_err = {}
    for cfg in sla_triton.usable_configs(sla_triton.ATTN_CONFIGS, 128, False, False):
        o = sla_triton.attention_launch(qs, ks_, vs, lut, proj_w=w, proj_b=b, config=cfg)
        cfg_err[_cfg_name(cfg)] = round(rel_l2(o, ref), 6)
    out = sla_triton.sla_forward(qs, ks_, vs, w, b, topk)
    # SageSLA-class on its own block map (64 x 128 on sm90): the sparse part against fp32
    # attention over the same blocks plus the reference linear branch (first 4 query blocks)
    bq, bk = sagesla_triton.default_blocks()
    lut_s = sla_triton.block_lut(qs, ks_, topk, bq, bk)
    expect_s = _dense_on_selection(qs[:, :rows], ks_, vs, lut_s[:, :, :-(-rows // bq)], bq, bk) \
        + _linear_branch(qs[:, :rows], ks_, vs, w, b)
    sage_err = {}
    for v_fp8 in (True, False):
        for cfg in sla_triton.usable_configs(sla_triton.ATTN_CONFIGS, bq, True, v_fp8):
            o = sagesla_triton.sagesla_forward(qs, ks_, vs, w, b, topk, v_fp8=v_fp8, config=cfg)
            sage_err[("fp8v " if v_fp8 else "f16v ") + _cfg_name(cfg)] = round(rel_l2(o[:, :rows], expect_s), 5)
    s8 = sagesla_triton.sagesla_forward(qs, ks_, vs, w, b, topk, v_fp8=True)
    s16 = sagesla_triton.sagesla_forward(qs, ks_, vs, w, b, topk, v_fp8=False)
    CHECKS[case] = dict(
        kk=kk,
        map_mismatched_blocks=int((mine != smap).sum()), map_blocks=int(smap.numel()),
        sla_vs_reference_rel_l2=rel_l2(out, ref), sla_vs_reference_max_abs=max_abs(out, ref),
        sla_config_vs_reference_rel_l2_max=max(cfg_err.values()),
        sage_blocks=f"{bq}x{bk}",
        sage_fp8v_vs_fp32_on_selection_rel_l2=rel_l2(s8[:, :rows], expect_s),
        sage_f16v_vs_fp32_on_selection_rel_l2=rel_l2(s16[:, :rows], expect_s),
        sage_config_rel_l2_max=max(sage_err.values()),
        sagesla_fp8v_vs_sla_rel_l2=rel_l2(s8, out), sagesla_f16v_vs_sla_rel_l2=rel_l2(s16, out),
    )
    INFO.setdefault("attention_config_errors", {})[case] = dict(sla=cfg_err, sage=sage_err)
    log(f"check {case}: {CHECKS[case]}")
    log(f"  per config: {cfg_err} {sage_err}")
    del ref, out, s8, s16, expect_s
    torch.cuda.empty_cache()

    # ---- timing, all heads
    dense_flops = 4 * h * n * n * d
    sparse_flops = 4 * h * n * kk * 64 * d
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # what the DiT's dense path passes to SDPA
    base = None
    for label, ctx in ([] if NO_SDPA else sdpa_backends()):
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
    sla_triton.attention_launch(q, k, v, lut, proj_w=w, proj_b=b, linear=state)  # autotunes
    tuned = sla_triton._tuned.get(("attn", n, h, 1, kk, d, 128, 64, True, False, False))
    runs = [
        ("SLA triton (full, proj_l)", lambda: sla_triton.sla_forward(q, k, v, w, b, topk)),
        ("  block map (pool+topk)", lambda: sla_triton.block_lut(q, k, topk)),
        ("  linear state phi(k)^T v", lambda: sla_triton.linear_state(k, v)),
        ("  attn kernel + linear epilogue", lambda: sla_triton.attention_launch(q, k, v, lut, proj_w=w, proj_b=b,
                                                                               linear=state)),
        ("  attn kernel, sparse only", lambda: sla_triton.attention_launch(q, k, v, lut, config=tuned)),
        ("SageSLA int8 QK + fp8 V (full)", lambda: sagesla_triton.sagesla_forward(q, k, v, w, b, topk, v_fp8=True)),
        ("  sage block map + q/k int8", lambda: sla_triton.block_lut(q, k, topk, *sagesla_triton.default_blocks(),
                                                                      quant=True)),
        ("  sage V -> fp8 V^T", lambda: sagesla_triton.quantize_v_fp8(v)),
        ("SageSLA int8 QK + fp16 V (full)", lambda: sagesla_triton.sagesla_forward(q, k, v, w, b, topk,
                                                                                     v_fp8=False)),
    ]
    for label, fn in runs:
        flops = sparse_flops if ("kernel" in label or "full" in label) else None
        ms = bench_ms(fn, rep)
        record(case, label, ms, flops, base if "full" in label else None)
    INFO.setdefault("tuned_attention", {}).update({str(key): cfg for key, cfg in sla_triton._tuned.items()})
    for key, times in sla_triton.TUNE_TIMES.items():
        if key[0] == "linear_state" and key[1] == n and key[3] == h:
            TUNING.append((case, "linear state", [(_cfg_name(c), round(t, 3)) for c, t in times]))
        elif key[0] == "attn" and key[1] == n and key[2] == h:
            TUNING.append((case, ("sage " if key[-2] else "SLA ") + ("fp8v " if key[-1] else "") + f"{key[6]}x{key[7]}",
                           [(_cfg_name(c), round(t, 3)) for c, t in times]))
    del q, k, v, qt, kt, vt, lut, state
    torch.cuda.empty_cache()


def _cfg_name(cfg) -> str:
    short = dict(BLOCK_M="M", BLOCK_N="N", CHUNK_N="C", GROUP_M="G", num_warps="w", num_stages="s")
    return " ".join(f"{short.get(k, k)}{int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())


def _linear_branch(q, k, v, w, b):
    """proj_l(linear attention) of q's rows over all of k, v, [B,L,H,D] bf16 (the reference's branch)."""
    from turbo_core.attention.sla_reference import linear_attention

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return F.linear(linear_attention(qt, kt, vt), w, b).transpose(1, 2)


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
    kern = w8a8_triton.W8A8Kernel()

    # ---- correctness: codes/scales on everything; the GEMM of every config at full size,
    # compared on the first 1024 rows and the last (partial) row tile with the reference
    xq, xs = w8a8_triton.quantize_act(x)
    rq, rs = quantize_int8(x)
    last = (m - 1) // 128 * 128
    slices = [slice(0, min(m, 1024)), slice(last, m)]
    refs = [w8a8_linear_reference(x[sl], qw, sw, bias) for sl in slices]
    mism = {}
    from turbo_core.kernels import w8a8_gluon
    gluon = w8a8_gluon.CONFIGS if w8a8_gluon.usable(x.device) else []
    for cfg in w8a8_triton.GEMM_CONFIGS + gluon:
        y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, config=cfg)
        mism[_cfg_name(cfg)] = sum(int((y[sl] != r).sum()) for sl, r in zip(slices, refs))
    ye = kern(x[:1024], qw, sw, bias)
    CHECKS[case] = dict(
        quant_codes_equal=bool(torch.equal(xq, rq)), quant_scales_equal=bool(torch.equal(xs, rs)),
        gemm_exact_mismatches=int((ye != refs[0]).sum()),
        gemm_every_config_full_size_mismatches=sum(mism.values()),
        vs_dense_bf16_rel_l2=rel_l2(ye, F.linear(x[:1024], wf, bias)),
    )
    INFO.setdefault("gemm_config_mismatches", {})[case] = mism
    log(f"check {case}: {CHECKS[case]} {mism}")
    del y, refs

    flops = 2 * m * n * kdim
    base = record(case, "bf16 F.linear (cuBLAS)", bench_ms(lambda: F.linear(x, wf, bias), rep), flops)
    w8 = record(case, "W8A8 triton (quant+gemm)", bench_ms(lambda: kern(x, qw, sw, bias), rep), flops, base)
    if DEV == "cuda":  # the same two for 2 s each: at the power cap, at the clock it allows
        ms, power = sustained_ms(lambda: F.linear(x, wf, bias), base)
        base2 = record(case, "bf16 F.linear, 2 s back to back", ms, flops, power=power)
        ms, power = sustained_ms(lambda: kern(x, qw, sw, bias), w8)
        record(case, "W8A8 triton (quant+gemm), 2 s back to back", ms, flops, base2, power=power)
    record(case, "  activation quant only", bench_ms(lambda: w8a8_triton.quantize_act(x), rep))
    record(case, "  int8 gemm only", bench_ms(lambda: w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias), rep),
           flops)
    # the block's gated residual add in the GEMM's epilogue, against the GEMM then the fused add
    from turbo_core.kernels import residual_norm_triton as rn
    res = torch.randn(m, n, device=DEV, generator=g).to(torch.bfloat16)
    gate = 0.5 * torch.randn(n, device=DEV, generator=g)

    def gemm_then_add():
        y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias)
        return rn.gated_add(res[None], y[None], gate.view(1, 1, n))[0]

    def gemm_epilogue():
        return w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, residual=res, gate=gate)

    CHECKS[case]["residual_epilogue_mismatches"] = int((gemm_epilogue() != gemm_then_add()).sum())
    base = record(case, "int8 gemm, then gated residual add", bench_ms(gemm_then_add, rep))
    record(case, "int8 gemm with the gated residual add in its epilogue", bench_ms(gemm_epilogue, rep),
           baseline_ms=base)
    del res
    INFO.setdefault("tuned_gemm", {}).update({str(key): cfg for key, cfg in w8a8_triton._tuned.items()})
    for key, times in w8a8_triton.TUNE_TIMES.items():
        if key[:3] == (m, n, kdim):
            TUNING.append((case, "int8 gemm", [(_cfg_name(c), round(t, 3)) for c, t in times]))
    del x, wf, xq, xs, rq, rs
    torch.cuda.empty_cache()


def gelu_quant_case(m, k, rep):
    """The FFN hidden state's GELU + activation quantisation: one pass vs torch's GELU then the
    quantisation (codes compared with those of torch's GELU)."""
    from turbo_core.kernels import w8a8_triton

    g = torch.Generator(device=DEV).manual_seed(3)
    h = (2 * torch.randn(m, k, device=DEV, generator=g)).to(torch.bfloat16)
    case = f"GELU + quant M={m} K={k}"
    q, s = w8a8_triton.quantize_act(h, gelu=True)
    rq, rs = w8a8_triton.quantize_act(F.gelu(h, approximate="tanh"))
    diff = (q.int() - rq.int()).abs()
    CHECKS[case] = dict(codes_max_diff=int(diff.max()), codes_differing=int((diff > 0).sum()),
                        scales_equal=bool(torch.equal(s, rs)))
    log(f"check {case}: {CHECKS[case]}")
    base = record(case, "torch GELU, then quant", bench_ms(
        lambda: w8a8_triton.quantize_act(F.gelu(h, approximate="tanh")), rep))
    record(case, "GELU + quant (one pass)", bench_ms(lambda: w8a8_triton.quantize_act(h, gelu=True), rep),
           baseline_ms=base)
    record(case, "  copy of the input (floor)", bench_ms(lambda: h.clone(), rep))
    del h, q, rq
    torch.cuda.empty_cache()


def block_ops_case(name, n, d, rep):
    from turbo_core.kernels import residual_norm_triton as rn
    from turbo_core.models.dit import LayerNorm

    g = torch.Generator(device=DEV).manual_seed(2)
    bf = torch.bfloat16
    x = torch.randn(1, n, d, device=DEV, generator=g).to(bf)
    y = torch.randn(1, n, d, device=DEV, generator=g).to(bf)
    shift, scale, gate = (0.5 * torch.randn(1, 6, d, device=DEV, generator=g)).chunk(6, dim=1)[:3]
    norm1 = LayerNorm(d, 1e-6)
    norm3 = LayerNorm(d, 1e-6, affine=True).to(DEV)
    norm3.weight.data.normal_(1.0, 0.1, generator=g)
    norm3.bias.data.normal_(0.0, 0.1, generator=g)
    case = f"block ops {name}"

    def t_mod():
        return torch.addcmul(shift, norm1(x).float(), 1 + scale).to(bf)

    def t_res3():
        x1 = x + y * gate.to(bf)
        return x1, norm3(x1)

    def t_res2():
        x2 = x + y
        return x2, torch.addcmul(shift, norm1(x2).float(), 1 + scale).to(bf)

    def t_gated():
        return x + y * gate.to(bf)

    pairs = {
        "norm1 + AdaLN": (t_mod, lambda: rn.norm(x, 1e-6, shift=shift, scale=scale)),
        "gated residual + norm3": (t_res3, lambda: rn.add_norm(x, y, gate, 1e-6, weight=norm3.weight,
                                                                   bias=norm3.bias)),
        "residual + norm2 + AdaLN": (t_res2, lambda: rn.add_norm(x, y, None, 1e-6, shift=shift, scale=scale)),
        "gated FFN residual": (t_gated, lambda: rn.gated_add(x, y, gate)),
    }
    checks = {}
    for what, (torch_fn, fused_fn) in pairs.items():
        ref, out = torch_fn(), fused_fn()
        ref = ref if isinstance(ref, tuple) else (ref,)
        out = out if isinstance(out, tuple) else (out,)
        for part, r, o in zip(("sum", "norm") if len(ref) == 2 else ("out",), ref, out):
            key = f"{what} {part}"
            diff = (o.float() - r.float()).abs()
            checks[key + " differing fraction"] = float((diff > 0).float().mean())
            checks[key + " max abs diff"] = float(diff.max())
        base = record(case, f"{what}: torch ops", bench_ms(torch_fn, rep))
        record(case, f"{what}: fused Triton", bench_ms(fused_fn, rep), baseline_ms=base)
    # norms straight to int8 (every reader a W8A8 layer): row stats + a normalising quantisation,
    # against the normed tensor then its quantisation; codes compared
    from turbo_core.kernels import w8a8_triton
    for what, params in (("norm3", dict(weight=norm3.weight, bias=norm3.bias)),
                         ("norm1 + AdaLN", dict(shift=shift, scale=scale))):
        def two_passes():
            h = rn.norm(x, 1e-6, **params)
            return w8a8_triton.quantize_act(h.reshape(-1, d))

        def straight():
            return w8a8_triton.quantize_norm(x, rn.norm_stats(x, 1e-6), **params)

        (q1, s1), (q2, s2) = two_passes(), straight()
        checks[f"{what} to int8: differing codes"] = int((q1 != q2).sum())
        checks[f"{what} to int8: max code difference"] = int((q1.int() - q2.int()).abs().max())
        checks[f"{what} to int8: differing tile scales"] = int((s1 != s2).sum())
        base = record(case, f"{what} to int8: norm, then quantisation", bench_ms(two_passes, rep))
        record(case, f"{what} to int8: row stats + normalising quantisation", bench_ms(straight, rep),
               baseline_ms=base)
    record(case, "  floor: bf16 copy of x", bench_ms(lambda: x.clone(), rep))
    CHECKS[case] = checks
    log(f"check {case}: {checks}")
    del x, y
    torch.cuda.empty_cache()


def cublas_peak(rep):
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    record("bf16 matmul 8192^3", "torch.mm (cuBLAS)", bench_ms(lambda: a @ bm, rep), 2 * 8192 ** 3)


# ----------------------------------------------------------------------------- main

def table() -> str:
    lines = ["| case | implementation | ms | TFLOP/s | speedup |", "|---|---|---:|---:|---:|"]
    for r in RESULTS:
        p = r.get("power", {})
        clock = f" ({p['sm_mhz']} MHz, {p['watts']} W)" if p.get("samples") else ""
        lines.append(f"| {r['case']} | {r['impl'].strip()}{' (part)' if r['impl'].startswith('  ') else ''}{clock} | "
                     f"{r['ms']:.3f} | {r.get('tflops', '')} | {('x' + str(r['speedup'])) if 'speedup' in r else ''} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["attn", "w8a8", "ops"])
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--no-autotune", action="store_true", help="use the first config of each kernel")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--no-sdpa", action="store_true", help="skip the dense SDPA baselines")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU interpreter, tiny shapes
    args = ap.parse_args()
    global DEV, NO_SDPA
    NO_SDPA = args.no_sdpa
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
            gelu_quant_case(32760 // small, 8960 // small, args.rep)
            if not args.skip_14b:
                gelu_quant_case(16384 // small, 13824 // small, args.rep)
            dump()
            if not args.smoke:
                cublas_peak(args.rep)
        if args.only in (None, "ops"):
            block_ops_case("1.3B-480p", 32760 // small, 1536 // small, args.rep)
            if not args.skip_14b:
                block_ops_case("14B-720p", 75600 // small, 5120 // small, args.rep)
            dump()
    finally:
        INFO["elapsed_s"] = round(time.time() - T0, 1)
        dump()
        print("\n## correctness checks (GPU)\n")
        for case, c in CHECKS.items():
            print(f"* {case}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in c.items()))
        print("\n## autotuning (do_bench medians, ms, per config)\n")
        for case, kernel, times in TUNING:
            print(f"* {case} {kernel}: " + "; ".join(f"{c}: {t}" for c, t in times))
        INFO["tuning"] = TUNING
        dump()
        print("\n## timings\n")
        print(table())
        print(f"\n{INFO.get('device')} torch {INFO.get('torch')} triton {INFO.get('triton')}, "
              f"elapsed {INFO['elapsed_s']} s")


if __name__ == "__main__":
    main()
