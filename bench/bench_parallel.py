"""Sequence-parallel DiT step time on 1, 2, 4 GPUs (turbo_core.parallel), random weights.

  python bench/bench_parallel.py [--model 14B] [--gpus 1,2,4] [--attention sla] [--weights bf16] [--reps 3]

Launches `torchrun --nproc-per-node N` on this script for each N; every rank builds the
same random model (same seed) on its GPU and runs one DiT forward (= one sampling step)
at 81 frames: 14B-720p is latent [1,16,21,90,160], L = 75600 tokens, 40 heads. N = 1 is
the plain single-GPU forward. Reported per N: median step time, speed-up over 1 GPU,
scaling efficiency t1 / (N * tN), the all-to-all time one step spends (timed alone at
the step's message sizes), peak memory, and the output's rel_l2 against the 1-GPU one.
Prints a markdown table; writes $OUT/bench_parallel.json when OUT is set.
`--model tiny` runs the same on the CPU (gloo) in seconds, to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from turbo_core.models.dit import HEAD_DIM  # noqa: E402

MODELS = {
    "14B": dict(model=dict(dim=5120, layers=40, ffn_dim=13824), latent=(1, 16, 21, 90, 160)),
    "1.3B": dict(model=dict(dim=1536, layers=30, ffn_dim=8960), latent=(1, 16, 21, 60, 104)),
    "tiny": dict(model=dict(dim=512, layers=2, ffn_dim=1024), latent=(1, 16, 3, 10, 18)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_main(args) -> None:
    """One rank of a torchrun launch (or the single process for N = 1)."""
    import torch.distributed as dist

    from turbo_core.models.dit_loader import dit_from_state_dict
    from turbo_core.parallel import init_from_env, shutdown
    from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

    sp = init_from_env()
    n = 1 if sp is None else sp.world_size
    dev = sp.device if sp is not None else torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg = MODELS[args.model]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sd = tiny_dit_state_dict(**cfg["model"], text_dim=4096, device=dev, dtype=dtype)  # same seed on every rank
    if args.weights == "int8":
        sd = quantize_state_dict(sd)
    model = dit_from_state_dict(sd, device=dev, dtype=dtype, source=f"random {args.model}")
    del sd
    if sp is not None:
        sp.check_heads(model.config.num_heads, model.config.variant)
        model.parallel = sp
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(cfg["latent"], generator=g, device=dev).to(dtype)
    ctx = torch.randn(1, 512, 4096, generator=g, device=dev).to(dtype)
    ctx[:, 100:] = 0
    t = torch.tensor([988.0], device=dev)

    def step():
        return model(x, t, ctx, attention=args.attention, sla_topk=0.1)

    with torch.inference_mode():
        out = step()  # warm-up (kernels compile, NCCL connects)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(args.reps):
            if sp is not None:
                dist.barrier()
            sync(dev)
            t0 = time.perf_counter()
            out = step()
            sync(dev)
            times.append(time.perf_counter() - t0)
        a2a = all_to_all_seconds(sp, model, cfg, dev, dtype, args.reps) if sp is not None else 0.0
    times.sort()
    row = dict(gpus=n, step_s=times[len(times) // 2], all_to_all_s=a2a,
               peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    if sp is None or sp.is_lead:
        torch.save(out.float().cpu(), args.result + ".pt")
        with open(args.result, "w") as f:
            json.dump(row, f)
    shutdown()


def all_to_all_seconds(sp, model, cfg, dev, dtype, reps) -> float:
    """The exchanges of one step timed alone: per block, q/k/v out and the attention result back."""
    _, _, t, h, w = cfg["latent"]
    length = t * (h // 2) * (w // 2)
    chunk = -(-length // sp.world_size)
    heads = model.config.num_heads
    qkv = torch.empty(sp.world_size, 3, 1, chunk, heads // sp.world_size, HEAD_DIM, device=dev, dtype=dtype)
    back = torch.empty(sp.world_size, 1, chunk, heads // sp.world_size, HEAD_DIM, device=dev, dtype=dtype)
    times = []
    for i in range(reps + 1):
        sync(dev)
        t0 = time.perf_counter()
        for _ in model.blocks:
            sp.all_to_all(qkv)
            sp.all_to_all(back)
        sync(dev)
        if i:  # the first round warms up
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def driver(args) -> None:
    cuda = torch.cuda.is_available()
    have = torch.cuda.device_count() if cuda else os.cpu_count()
    name = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
    print(f"{name} x{torch.cuda.device_count() if cuda else 0}, torch {torch.__version__}, model {args.model}, "
          f"{args.weights} weights, attention {args.attention}")
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.gpus.split(",")]:
            if cuda and n > have:
                rows.append(dict(gpus=n, error=f"only {have} GPU(s)"))
                print(rows[-1], flush=True)
                continue
            result = os.path.join(tmp, f"n{n}.json")
            launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(n)]
            cmd = [sys.executable, *launcher, os.path.abspath(__file__), "--rank-main", "--result", result,
                   "--model", args.model, "--weights", args.weights, "--attention", args.attention,
                   "--reps", str(args.reps)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(result):
                rows.append(dict(gpus=n, error=(proc.stderr or proc.stdout)[-800:]))
                print(rows[-1], flush=True)
                continue
            with open(result) as f:
                row = json.load(f)
            out = torch.load(result + ".pt")
            if ref is None and n == 1:
                ref = out
            if ref is not None:
                row["rel_l2_vs_1"] = float((out.double() - ref.double()).norm() / ref.double().norm())
            rows.append(row)
            print(row, flush=True)
    base = next((r["step_s"] for r in rows if r.get("gpus") == 1 and "step_s" in r), None)
    for r in rows:
        if base and "step_s" in r:
            r["speedup"] = base / r["step_s"]
            r["efficiency"] = base / (r["gpus"] * r["step_s"])
    print("\n| GPUs | step (s) | speed-up | scaling efficiency | all-to-all (s/step) | peak GiB | rel_l2 vs 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['gpus']} | error: {r['error'][-200:]!r} | | | | | |")
            continue
        fmt = lambda k, spec: format(r[k], spec) if r.get(k) is not None else "-"  # noqa: E731
        print(f"| {r['gpus']} | {r['step_s']:.3f} | {fmt('speedup', '.2f')} | {fmt('efficiency', '.0%')} | "
              f"{r['all_to_all_s']:.3f} | {fmt('peak_gib', '.1f')} | {fmt('rel_l2_vs_1', '.1e')} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_parallel.json"), "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, model=args.model, weights=args.weights,
                           attention=args.attention, rows=rows), f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="14B")
    ap.add_argument("--gpus", default="1,2,4", help="process counts to measure (each must divide the heads)")
    ap.add_argument("--attention", default="sla", choices=["sla", "sagesla", "original"])
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
