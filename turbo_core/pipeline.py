"""Text/image to video: text encoder -> rCM sampling -> VAE decode -> frames and files.

Memory choreography (what lets 14B models run on 24 GB cards): the text encoder
runs first and can stay on the CPU; each DiT sits on the GPU only while it
samples; with two experts that do not fit together, only one is on the GPU at a
time; the VAE decodes (optionally tiled) after the DiT has left the GPU.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .sampling.rcm import draw_noise, rcm_sample
from .sampling.sizes import adaptive_size, latent_shape, validate_size

log = logging.getLogger("turbo_core")


@dataclass
class GenerationResult:
    frames: torch.Tensor | None  # [B, F, H, W, 3] float32 in 0..1 (ComfyUI IMAGE layout); None off rank 0
    latent: torch.Tensor  # [B, 16, T, H/8, W/8] normalized latent
    paths: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)  # GiB


@contextmanager
def _timed(timings: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def compute_device(*models) -> torch.device:
    """The GPU if there is one, else where the first model lives."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next((m.device for m in models if m is not None), torch.device("cpu"))


def _module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _fits(models, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    resident = sum(_module_bytes(m) for m in models if m.device.type != "cuda")
    return resident < free * 0.85


def _to(model, device):
    if model is not None and model.device != torch.device(device):
        model.to(device)
        if torch.device(device).type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def encode_prompts(text_encoder, prompts) -> torch.Tensor:
    """[B, 512, 4096] context; runs where the encoder lives (users keep it on the CPU)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return text_encoder.encode(prompts)


def sample_latent(models, context, *, shape, steps, sigma_max, seed, y=None, boundary=0.9, ode=False,
                  attention="auto", sla_topk=0.1, noise_device="cpu", callback=None, offload_models=True,
                  device=None, parallel=None):
    """rCM sampling with the experts moved to `device` (default: the GPU) only while they run.

    parallel: a turbo_core.parallel.SequenceParallel; every rank of the group calls this with
    the same arguments and gets the same latent. context, y and the noise are rank 0's
    (broadcast; the other ranks may pass None for context and y); `device` is the rank's.
    """
    experts = list(models) if isinstance(models, (list, tuple)) else [models]
    noise = None
    if parallel is not None:
        for m in experts:
            parallel.check_heads(m.config.num_heads, m.config.variant)
        device = parallel.device
    device = torch.device(device) if device is not None else compute_device(*experts)
    both_fit = _fits(experts, device)
    first = experts[0]
    if both_fit:
        for m in experts:
            _to(m, device)
    else:
        for m in experts[1:]:  # one at a time (a previous run may have left another one on the GPU)
            _to(m, "cpu")
        _to(first, device)
    if parallel is not None:
        context, y = parallel.broadcast(context), parallel.broadcast(y)
        noise_at = device if str(noise_device) == "model" else torch.device(noise_device)
        drawn = draw_noise(shape, steps=steps, seed=seed, ode=ode, device=noise_at) if parallel.is_lead else []
        noise = [parallel.broadcast(drawn[i] if drawn else None) for i in range(1 if ode else steps + 1)]

    def offload(active, inactive):
        if not both_fit:
            _to(inactive, "cpu")
            _to(active, device)

    try:
        if parallel is not None:
            for m in experts:  # WanDiT.forward runs this rank's share of the tokens
                m.parallel = parallel
        return rcm_sample(experts if len(experts) > 1 else first, context.to(device), latent_shape=shape,
                          steps=steps, sigma_max=sigma_max, seed=seed,
                          y=None if y is None else y.to(device), boundary=boundary, ode=ode, noise=noise,
                          noise_device=noise_device, attention=attention, sla_topk=sla_topk,
                          callback=callback, offload=offload)
    finally:
        for m in experts:
            m.release_graphs()  # a captured step's memory, before the VAE needs it
        if parallel is not None:
            for m in experts:
                m.parallel = None
        if offload_models and device.type == "cuda":
            for m in experts:
                _to(m, "cpu")


def decode_latent(vae, latent: torch.Tensor, *, tile=None, progress=None) -> torch.Tensor:
    """Normalized latent -> frames [B, F, H, W, 3] float32 in 0..1 on the CPU."""
    video = vae.decode(latent.to(vae.device), tile=tile, progress=progress)  # [B,3,F,H,W] in [-1,1]
    return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).float().cpu()


def image_to_tensor(image) -> torch.Tensor:
    """PIL image, path, HWC/BHWC tensor in 0..1 or uint8 array -> [3, H, W] float32 in 0..1 (RGB)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, str) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if t.ndim == 4:
        t = t[0]  # ComfyUI IMAGE batch: first image
    if t.ndim == 2:
        t = t[..., None]
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[-1] == 1:  # grayscale
        t = t.expand(*t.shape[:-1], 3)
    elif t.shape[-1] == 4:  # RGBA: drop alpha (composited on black by the alpha itself)
        t = t[..., :3] * t[..., 3:]
    return t[..., :3].permute(2, 0, 1).contiguous()


def i2v_condition(vae, image, *, width: int, height: int, num_frames: int, tile=None,
                  progress=None) -> torch.Tensor:
    """The Wan2.2 I2V condition y [1, 20, T, H/8, W/8]: 4 mask channels + latent of [image, zeros]."""
    validate_size(width, height)
    shape = latent_shape(1, num_frames, height, width)
    img = image_to_tensor(image)[None]  # [1,3,h,w]
    img = F.interpolate(img, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    img = img.clamp(0, 1) * 2 - 1
    video = torch.zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = img[0]
    latent = vae.encode(video.to(vae.device), tile=tile, progress=progress)  # [1,16,T,h/8,w/8]
    mask = torch.zeros(1, 4, *shape[2:], device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent.float()], dim=1)


def _finish(vae, latent, lead, vae_tile, progress, out, fps, format, quality, timings) -> GenerationResult:
    """Decode (lead rank only: the others return just the latent), write `out`, report."""
    from .io.video import write_video

    if not lead:
        return GenerationResult(frames=None, latent=latent, timings=timings)
    with _timed(timings, "vae decode"):
        frames = decode_latent(vae, latent, tile=vae_tile, progress=progress and progress("vae decode"))
    paths = []
    if out is not None:
        out = str(out)
        for i in range(frames.shape[0]):
            path = out if frames.shape[0] == 1 else out.replace(".", f"_{i:02d}.", 1) if "." in out else f"{out}_{i}"
            paths.append(str(write_video(frames[i], path, fps=fps, format=format, quality=quality)))
    peak = {}
    if torch.cuda.is_available():
        peak["gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return GenerationResult(frames=frames, latent=latent, paths=paths, timings=timings, peak_memory=peak)


def generate_t2v(dit, vae, text_encoder, prompt, *, width: int = 832, height: int = 480, num_frames: int = 81,
                 steps: int = 4, seed: int = 0, sigma_max: float = 80.0, attention: str = "auto",
                 sla_topk: float = 0.1, noise_device: str = "cpu", batch_size: int = 1, vae_tile=None,
                 out=None, fps: float = 16, format: str | None = None, quality: int | None = None,
                 callback=None, progress=None, parallel=None) -> GenerationResult:
    """Text to video with a Wan2.1 T2V TurboWan model. Returns frames (and writes `out` if given).

    callback(step, steps, x) runs after each sampling step; progress(phase) may return a
    (done, total) callback for the VAE phases (the CLI's progress bars).
    parallel: a turbo_core.parallel.SequenceParallel (every rank calls this). Only rank 0
    encodes the prompt and decodes (the others may pass None for vae and text_encoder);
    the other ranks return frames=None.
    """
    shape = latent_shape(batch_size, num_frames, height, width)
    if dit.config.is_i2v:
        raise ValueError(f"{dit.config.variant} is an image-to-video model: use generate_i2v")
    lead = parallel is None or parallel.is_lead
    timings: dict[str, float] = {}
    with _timed(timings, "text encoder"):
        context = encode_prompts(text_encoder, prompt) if lead else None
    with _timed(timings, "sampling"):
        latent = sample_latent(dit, context, shape=shape, steps=steps, sigma_max=sigma_max, seed=seed,
                               attention=attention, sla_topk=sla_topk, noise_device=noise_device,
                               callback=callback, parallel=parallel)
    return _finish(vae, latent, lead, vae_tile, progress, out, fps, format, quality, timings)


def generate_i2v(models, vae, text_encoder, prompt, image, *, width: int = 1280, height: int = 720,
                 adaptive_resolution: bool = False, num_frames: int = 81, steps: int = 4, seed: int = 0,
                 sigma_max: float = 200.0, boundary: float = 0.9, ode: bool = False, attention: str = "auto",
                 sla_topk: float = 0.1, noise_device: str = "cpu", batch_size: int = 1, vae_tile=None,
                 out=None, fps: float = 16, format: str | None = None, quality: int | None = None,
                 callback=None, progress=None, parallel=None) -> GenerationResult:
    """Image to video with Wan2.2 I2V A14B: `models` is (high_noise, low_noise) or one expert.

    parallel: as in generate_t2v (only rank 0 encodes the prompt and the image, and decodes).
    """
    experts = list(models) if isinstance(models, (list, tuple)) else [models]
    if not all(m.config.is_i2v for m in experts):
        raise ValueError("generate_i2v needs Wan2.2 I2V models (36 input channels); this is a text-to-video model")
    if adaptive_resolution:
        img = image_to_tensor(image)
        width, height = adaptive_size(img.shape[2], img.shape[1], width, height)
    shape = latent_shape(batch_size, num_frames, height, width)
    lead = parallel is None or parallel.is_lead
    timings: dict[str, float] = {}
    context = y = None
    if lead:
        with _timed(timings, "text encoder"):
            context = encode_prompts(text_encoder, prompt)
        with _timed(timings, "vae encode"):
            y = i2v_condition(vae, image, width=width, height=height, num_frames=num_frames, tile=vae_tile,
                              progress=progress and progress("vae encode")).expand(batch_size, -1, -1, -1, -1)
    with _timed(timings, "sampling"):
        latent = sample_latent(experts, context, shape=shape, steps=steps, sigma_max=sigma_max, seed=seed,
                               y=y, boundary=boundary, ode=ode,
                               attention=attention, sla_topk=sla_topk, noise_device=noise_device,
                               callback=callback, parallel=parallel)
    return _finish(vae, latent, lead, vae_tile, progress, out, fps, format, quality, timings)
