"""`python -m turbo_core demo`: the whole T2V pipeline on tiny random models, on the CPU.

The model files are written in the real layouts to a temporary folder and
loaded back through the same loaders real checkpoints use, so this exercises
everything except the trained weights. The video is noise: the weights are random.
"""
from __future__ import annotations

import tempfile
import time

import torch

from .models.dit_loader import load_dit
from .models.umt5 import load_text_encoder
from .models.vae import load_vae
from .pipeline import generate_t2v
from .tiny import write_tiny_models


def run_demo(out: str = "demo.mp4", *, frames: int = 17, seed: int = 0, width: int = 128, height: int = 96) -> int:
    print("demo: TINY RANDOM WEIGHTS - the video is noise; this checks the install, not the model.")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turbo-demo-") as folder:
        paths = write_tiny_models(folder, seed=seed)
        dit = load_dit(paths["dit"], device="cpu", dtype=torch.float32)
        vae = load_vae(paths["vae"], device="cpu")
        text_encoder = load_text_encoder(paths["text_encoder"], device="cpu", dtype=torch.float32)
    result = generate_t2v(dit, vae, text_encoder, "a red fox running through fresh snow, cinematic",
                          width=width, height=height, num_frames=frames, steps=4, seed=seed,
                          attention="sla", sla_topk=0.5, out=out)
    f, h, w, _ = result.frames[0].shape
    print(f"demo: wrote {result.paths[0]} ({f} frames, {w}x{h}) in {time.perf_counter() - t0:.1f} s")
    return 0
