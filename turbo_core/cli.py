"""`python -m turbo_core COMMAND ...` — the command-line face of the engine.

  t2v / i2v   generate a video from model files; on several GPUs with
              `torchrun --nproc-per-node N -m turbo_core t2v ...` (sequence parallel)
  demo        tiny random models, end to end, in seconds on the CPU
  doctor      what this machine can run, and what model files a ComfyUI folder holds
  convert     rewrite a DiT checkpoint as .safetensors
  queue       send a workflow to a running ComfyUI server and fetch the outputs
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager

from .client import add_queue_parser
from .io.checkpoint import CheckpointError


_LEAD = True  # False on the ranks > 0 of a torchrun group: they compute and stay quiet


@contextmanager
def _phase(name: str):
    """Says what is happening and how long it took (sampling also gets a tqdm bar)."""
    t0 = time.perf_counter()
    if _LEAD:
        print(f"{name} ...", flush=True)
    yield
    if _LEAD:
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


def _bar(desc: str):
    """A (done, total) callback that drives a tqdm bar, opened on first use."""
    from tqdm import tqdm

    if not _LEAD:
        return lambda done, total: None
    bar = None

    def update(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _sampling_bar():
    bar = _bar("sampling")
    return lambda step, steps, x: bar(step + 1, steps)


def _report(result, t0: float) -> None:
    import torch

    for name, seconds in result.timings.items():
        print(f"  {name:<14}{seconds:7.2f} s")
    print(f"  {'total':<14}{time.perf_counter() - t0:7.2f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    print(f"  peak memory: CPU {rss:.2f} GiB{gpu}")
    for path in result.paths:
        print(f"wrote {path}")


def _size(args, default_res: str, default_aspect: str = "16:9"):
    from .sampling.sizes import RESOLUTIONS

    if args.width or args.height:
        if not (args.width and args.height):
            raise SystemExit("give both --width and --height")
        return args.width, args.height
    res = args.resolution or default_res
    return RESOLUTIONS[res][args.aspect or default_aspect]


def _load_common(args):
    from .models.umt5 import load_text_encoder
    from .models.vae import load_vae

    with _phase("loading text encoder"):
        te = load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, device=args.text_encoder_device)
    with _phase("loading VAE"):
        vae = load_vae(args.vae, device=args.device)
    return te, vae


def _video_kwargs(args):
    return dict(steps=args.steps, seed=args.seed, attention=args.attention, sla_topk=args.sla_topk,
                noise_device=args.noise_device, vae_tile=True if args.vae_tiling else None,
                out=args.out if _LEAD else None, fps=args.fps, quality=args.quality, num_frames=args.frames)


@contextmanager
def _torchrun_group():
    """Under `torchrun --nproc-per-node N` (N > 1): join the group for sequence-parallel sampling
    (turbo_core.parallel); rank 0 encodes, decodes, prints and writes the video. Else None."""
    global _LEAD
    from .parallel import ParallelError, init_from_env, shutdown

    sp = init_from_env()
    _LEAD = sp is None or sp.is_lead
    try:
        yield sp
    except ParallelError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        shutdown()


def cmd_t2v(args) -> int:
    from .models.dit_loader import load_dit
    from .pipeline import generate_t2v

    t0 = time.perf_counter()
    width, height = _size(args, "480p")
    with _torchrun_group() as sp:
        with _phase("loading DiT"):
            dit = load_dit(args.dit, device="cpu", dtype=args.dtype, progress=_bar("loading DiT"))
        if sp is not None:
            sp.check_heads(dit.config.num_heads, dit.config.variant)
        if _LEAD:
            print(dit.load_report.summary())
        te, vae = _load_common(args) if _LEAD else (None, None)
        if args.compile:
            dit.compile_blocks()
        dit.set_cuda_graphs(args.cuda_graphs)
        result = generate_t2v(dit, vae, te, args.prompt, width=width, height=height,
                              sigma_max=args.sigma_max or 80.0, callback=_sampling_bar(), progress=_bar,
                              parallel=sp, **_video_kwargs(args))
    if _LEAD:
        _report(result, t0)
    return 0


def cmd_i2v(args) -> int:
    from .models.dit_loader import load_dit
    from .pipeline import generate_i2v

    t0 = time.perf_counter()
    width, height = _size(args, "720p")
    with _torchrun_group() as sp:
        with _phase("loading DiT experts"):
            experts = [load_dit(p, device="cpu", dtype=args.dtype, progress=_bar(f"loading {os.path.basename(p)}"))
                       for p in (args.dit, args.dit_low) if p]
        for m in experts:
            if sp is not None:
                sp.check_heads(m.config.num_heads, m.config.variant)
            if _LEAD:
                print(m.load_report.summary())
            if args.compile:
                m.compile_blocks()
            m.set_cuda_graphs(args.cuda_graphs)
        te, vae = _load_common(args) if _LEAD else (None, None)
        result = generate_i2v(experts, vae, te, args.prompt, args.image, width=width, height=height,
                              adaptive_resolution=args.adaptive_resolution, sigma_max=args.sigma_max or 200.0,
                              boundary=args.boundary, ode=args.ode, callback=_sampling_bar(), progress=_bar,
                              parallel=sp, **_video_kwargs(args))
    if _LEAD:
        _report(result, t0)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, frames=args.frames, seed=args.seed)


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor(args.models)


def cmd_convert(args) -> int:
    from .models.dit_loader import convert_to_safetensors

    if not str(args.output).endswith(".safetensors"):
        raise SystemExit("convert: the output file must end in .safetensors")
    report = convert_to_safetensors(args.input, args.output)
    print(f"{args.output}: {report.variant}, {report.loaded} tensors")
    for c in report.converted:
        print(f"  converted: {c}")
    return 0


def _video_args(p, steps_default=4):
    from .attention import BACKENDS

    p.add_argument("--vae", required=True, help="Wan2.1 VAE file (models/vae)")
    p.add_argument("--text-encoder", required=True, help="umT5-XXL encoder file (models/text_encoders)")
    p.add_argument("--tokenizer", help="folder or file with spiece.model / tokenizer.json (default: auto)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="output.mp4", help="video file to write (.mp4, .webm, .gif, .webp)")
    p.add_argument("--steps", type=int, default=steps_default, help="sampling steps, 1-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma-max", type=float, help="initial sigma (default 80 for T2V, 200 for I2V)")
    p.add_argument("--attention", default="auto", choices=BACKENDS)
    p.add_argument("--sla-topk", type=float, default=0.1, help="fraction of key blocks SLA attends (0.1-0.2)")
    p.add_argument("--frames", type=int, default=81, help="number of frames, 4k+1")
    p.add_argument("--resolution", choices=["480p", "720p"])
    p.add_argument("--aspect", choices=["16:9", "9:16", "4:3", "3:4", "1:1"])
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="compute device (default: cuda if available)")
    p.add_argument("--text-encoder-device", default=None, help="cpu keeps umT5 off a small GPU")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less GPU memory)")
    p.add_argument("--noise-device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: same seed, same video on any GPU; cuda: reproduce the official scripts")
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--quality", type=int, default=None, help="0-100 (default: visually lossless-ish)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (one-time warm-up; steps within 2%% of the default "
                        "eager blocks, which run fused Triton kernels)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each DiT step as one CUDA graph: for small models whose steps wait on "
                        "Python's kernel launches (1.3B-480p int8 on an H100: 3%% faster per replayed step; no gain at 14B)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (load reports, backends)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("t2v", help="text to video (Wan2.1 T2V 1.3B / 14B)")
    p.add_argument("--dit", required=True, help="TurboWan T2V checkpoint (models/diffusion_models)")
    _video_args(p)
    p.set_defaults(func=cmd_t2v)

    p = sub.add_parser("i2v", help="image to video (Wan2.2 I2V A14B, high + low noise experts)")
    p.add_argument("--dit", required=True, help="high-noise expert")
    p.add_argument("--dit-low", help="low-noise expert (recommended)")
    p.add_argument("--image", required=True)
    p.add_argument("--adaptive-resolution", action="store_true", help="follow the image's aspect ratio")
    p.add_argument("--boundary", type=float, default=0.9, help="switch to the low-noise expert below this t")
    p.add_argument("--ode", action="store_true", help="deterministic Euler steps instead of SDE")
    _video_args(p)
    p.set_defaults(func=cmd_i2v)

    p = sub.add_parser("demo", help="tiny random models end to end (no downloads), writes an MP4")
    p.add_argument("--out", default="demo.mp4")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="versions, available kernels, and the model files in a folder")
    p.add_argument("models", nargs="?", help="a ComfyUI models folder (or any folder of model files)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("convert", help="rewrite a DiT checkpoint (.pth, any layout) as .safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=cmd_convert)

    add_queue_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}" if _LEAD else f"rank {os.environ.get('RANK')}: error: {err}", file=sys.stderr)
        return 2
