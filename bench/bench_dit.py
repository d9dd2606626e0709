"""Full DiT step time and peak memory on the GPU, random weights at the real sizes.

  python bench/bench_dit.py [--only 1.3B|14B] [--reps 3] [--runs int8+sla,...] [--compile]
                           [--ffn-chunk 0,16384] [--profile] [--torch-norm-rope] [--torch-block-ops]
                           [--cuda-graphs]

One step = one forward of the network at 81 frames (21 latent frames):
1.3B-480p: latent [1,16,21,60,104] (L = 32760); 14B-720p: [1,16,21,90,160] (L = 75600).
Prints a markdown table, with the GPU's median SM clock and mean power during the timed steps
(bench/gpu_power.py); writes $OUT/bench_dit.json when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_power import PowerSampler  # noqa: E402
from turbo_core.models.dit_loader import dit_from_state_dict  # noqa: E402
from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict  # noqa: E402

CONFIGS = {
    "1.3B": dict(model=dict(dim=1536, layers=30, ffn_dim=8960), latent=(1, 16, 21, 60, 104)),
    "14B": dict(model=dict(dim=5120, layers=40, ffn_dim=13824), latent=(1, 16, 21, 90, 160)),
}
RUNS = [("bf16", "original"), ("bf16", "sla"), ("bf16", "sagesla"), ("int8", "sla"), ("int8", "sagesla")]


def try_kernels() -> str:
    try:
        from turbo_core import kernels

        return "on" if kernels.install() else "unavailable"
    except ImportError as err:
        return f"missing ({err})"


def time_forward(model, x, t, ctx, attention, reps):
    torch.cuda.synchronize()
    model(x, t, ctx, attention=attention)  # warm-up (Triton compiles here)
    if model.cuda_graphs:
        model(x, t, ctx, attention=attention)  # the capture
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with PowerSampler(torch.cuda.current_device()) as power:
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, t, ctx, attention=attention)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    # a replayed graph allocates nothing: its activations are the pool reserved for it
    peak = torch.cuda.max_memory_reserved() if model.cuda_graphs else torch.cuda.max_memory_allocated()
    return times[len(times) // 2], peak / 2**30, power.summary()


def profile_step(model, x, t, ctx, attention):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(x, t, ctx, attention=attention)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", default=",".join(f"{w}+{a}" for w, a in RUNS))
    ap.add_argument("--compile", action="store_true", help="also time each run with compiled blocks")
    ap.add_argument("--compile-only", action="store_true", help="time compiled blocks only")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per run")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay each step as a CUDA graph (peak = reserved memory for these rows)")
    ap.add_argument("--torch-norm-rope", action="store_true",
                    help="q/k RMSNorm + RoPE with PyTorch ops instead of the fused Triton kernel")
    ap.add_argument("--linear", default="w8a8", choices=["w8a8", "dequant", "auto"],
                    help="int8 runs: the W8A8 kernel (default), dequantised weights + cuBLAS, or auto (timed)")
    ap.add_argument("--torch-block-ops", action="store_true",
                    help="residual adds, LayerNorms and AdaLN with PyTorch ops instead of the fused Triton kernel")
    ap.add_argument("--ffn-chunk", default=None,
                    help="comma list of FFN pass sizes in tokens to time (0 = one pass; default: the model's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("turbo_core").setLevel(logging.INFO)  # the attention / int8 choices
    runs = [tuple(r.split("+")) for r in args.runs.split(",")]
    dev = torch.device("cuda")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, kernels {try_kernels()}")
    if args.torch_norm_rope:
        from turbo_core.models.dit import SelfAttention

        SelfAttention.fused_norm_rope = None
    if args.torch_block_ops:
        from turbo_core.models.dit import Block

        Block.fused_ops = None
    rows = []
    for name, cfg in CONFIGS.items():
        if args.only and name != args.only:
            continue
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(cfg["latent"], generator=g, device=dev).bfloat16()
        ctx = torch.randn(1, 512, 4096, generator=g, device=dev).bfloat16()
        ctx[:, 100:] = 0  # the text encoder's zero rows after the prompt
        t = torch.tensor([988.0], device=dev)
        for weights in ("bf16", "int8"):
            todo = [a for w, a in runs if w == weights]
            if not todo:
                continue
            sd = tiny_dit_state_dict(**cfg["model"], text_dim=4096, device=dev)
            if weights == "int8":
                sd = quantize_state_dict(sd)
            model = dit_from_state_dict(sd, device=dev, dtype=torch.bfloat16, source=f"random {name}",
                                        linear=args.linear if weights == "int8" else "auto")
            del sd
            model.set_cuda_graphs(args.cuda_graphs)
            gc.collect()
            torch.cuda.empty_cache()
            weights_gib = torch.cuda.memory_allocated() / 2**30
            chunks = [None] if args.ffn_chunk is None else [int(c) for c in args.ffn_chunk.split(",")]
            for compiled in ([True] if args.compile_only else [False, True] if args.compile else [False]):
                if compiled:
                    model.compile_blocks()
                for chunk, attention in [(c, a) for c in chunks for a in todo]:
                    if chunk is not None:
                        model.set_ffn_chunk(chunk)
                    label = attention + (" +compile" if compiled else "") + ("" if chunk is None else f" ffn{chunk}") \
                        + (" torch-norm-rope" if args.torch_norm_rope else "") \
                        + (" torch-block-ops" if args.torch_block_ops else "") \
                        + (" +graphs" if args.cuda_graphs else "") \
                        + (f" {args.linear}" if weights == "int8" and args.linear != "w8a8" else "")
                    try:
                        sec, peak, power = time_forward(model, x, t, ctx, attention, args.reps)
                        if args.profile:
                            profile_step(model, x, t, ctx, attention)
                        rows.append(dict(model=name, weights=weights, attention=label, step_s=sec,
                                         peak_gib=peak, weights_gib=weights_gib, power=power))
                    except Exception as err:  # keep the other rows
                        rows.append(dict(model=name, weights=weights, attention=label, error=repr(err)[:300]))
                        torch.cuda.empty_cache()
                    print(rows[-1], flush=True)
            del model
            torch._dynamo.reset()  # compiled blocks hold the model alive otherwise
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| model | weights | attention | step (s) | peak GiB | weights GiB | SM MHz (median) | W (mean, of limit) "
          "|\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['weights']} | {r['attention']} | error: {r['error']} | | | | |")
        else:
            p = r["power"]
            clocks = f"{p['sm_mhz']} | {p['watts']} of {p['limit_w']}" if p["samples"] else "n/a | n/a"  # no nvidia-smi
            print(f"| {r['model']} | {r['weights']} | {r['attention']} | {r['step_s']:.3f} | {r['peak_gib']:.1f} "
                  f"| {r['weights_gib']:.1f} | {clocks} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_dit.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
