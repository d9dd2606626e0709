"""`python -m turbo_core doctor [MODELS_DIR]`: what runs here, and what the model files are.

Files are inspected from their headers (safetensors) or memory-mapped (.pth), so
a folder of 30 GB checkpoints is checked in seconds without loading weights.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform

import torch

from .io.checkpoint import SAFETENSORS_EXT, TORCH_EXT, CheckpointError, guess_kind, read_shapes

# ComfyUI model folders and the kind of file each should hold
FOLDERS = {"diffusion_models": "dit", "unet": "dit", "vae": "vae", "text_encoders": "text", "clip": "text"}


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def environment() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("triton", _version("triton") if _version("triton") != "not installed" else _version("triton-windows")),
            ("PyAV", _version("av")), ("safetensors", _version("safetensors")),
            ("sentencepiece", _version("sentencepiece"))]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm{major}{minor}), "
                            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, CUDA {torch.version.cuda}"))
    else:
        rows.append(("GPU", "none (everything runs on the CPU with the PyTorch reference paths)"))
    return rows


def backends() -> list[tuple[str, str]]:
    from . import attention
    from .quant.int8 import Int8Linear

    fast = False
    try:
        from . import kernels

        fast = kernels.install()
    except ImportError:
        pass
    cuda = torch.cuda.is_available()
    sla = "Triton kernel" if cuda and "sla" in attention._FAST else "PyTorch reference"
    sage = "Triton kernel" if cuda and "sagesla" in attention._FAST else f"falls back to SLA ({sla})"
    auto = attention.resolve("auto", torch.device("cuda" if cuda else "cpu"))
    w8a8 = "Triton int8 GEMM" if cuda and Int8Linear.kernel is not None else "dequantize + matmul"
    return [("attention original", "torch SDPA"), ("attention sla", sla), ("attention sagesla", sage),
            ("attention auto", auto), ("int8 linear", w8a8), ("Triton kernels", "on" if fast else "off")]


def inspect_file(path: str) -> tuple[str, str, list[str]]:
    """(kind, details, problems) of one model file."""
    try:
        sd = read_shapes(path)
    except CheckpointError as err:
        return "unreadable", "", [str(err)]
    kind = guess_kind(sd)
    problems: list[str] = []
    if kind.startswith("Wan diffusion"):
        from .models.dit_loader import dit_from_state_dict

        try:
            model = dit_from_state_dict(sd, device="meta", source=os.path.basename(path))
        except CheckpointError as err:
            return "dit", "", [str(err)]
        r = model.load_report
        problems += [line.strip() for line in r.summary().splitlines()[1:] if "MISSING" in line or "MISMATCH" in line]
        return "dit", f"{r.variant}, {r.layout}", problems
    if kind.startswith("Wan video VAE"):
        from .models.vae import infer_config

        z = sd["conv2.weight"].shape[0] if "conv2.weight" in sd else None
        if z == 48:
            return "vae", "Wan2.2 VAE (48 channels)", ["TurboWan models need the 16-channel Wan2.1 VAE"]
        try:
            cfg = infer_config(sd)
        except (CheckpointError, KeyError) as err:
            return "vae", "", [f"not a Wan2.1 VAE layout: {err}"]
        return "vae", f"Wan2.1 VAE (dim {cfg.dim}, {cfg.z_dim} channels)", []
    if kind.startswith("T5"):
        from .models.umt5 import infer_config, to_wan_names

        tok = "tokenizer embedded" if "spiece_model" in sd else "tokenizer: looked up beside the file at load"
        try:
            cfg = infer_config(to_wan_names(sd, os.path.basename(path)), os.path.basename(path))
        except CheckpointError as err:
            return "text", "", [str(err)]
        return "text", f"umT5 ({cfg.num_layers} layers, dim {cfg.dim}), {tok}", []
    return "other", kind, []


def run_doctor(models_dir: str | None = None) -> int:
    print("environment")
    for name, value in environment():
        print(f"  {name:<20}{value}")
    print("backends")
    for name, value in backends():
        print(f"  {name:<20}{value}")
    if not models_dir:
        return 0
    if not os.path.isdir(models_dir):
        print(f"{models_dir}: not a folder")
        return 2
    print(f"model files under {models_dir}")
    found = 0
    for root, _, files in sorted(os.walk(models_dir)):
        for fname in sorted(files):
            if not fname.lower().endswith(SAFETENSORS_EXT + TORCH_EXT):
                continue
            found += 1
            path = os.path.join(root, fname)
            kind, details, problems = inspect_file(path)
            folder = os.path.relpath(root, models_dir).split(os.sep)[0]
            want = FOLDERS.get(folder)
            if want and kind in FOLDERS.values() and kind != want:
                home = [f for f, k in FOLDERS.items() if k == kind][0]
                problems.append(f"this is a {kind} file in {folder}/: move it to {home}/")
            print(f"  {os.path.relpath(path, models_dir)}: {details or kind}")
            for p in problems:
                print(f"      problem: {p}")
    if not found:
        print("  (no .safetensors / .pth files)")
    return 0
