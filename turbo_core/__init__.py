"""TurboDiffusion engine: TurboWan DiT, umT5, Wan VAE, rCM sampler. Plain PyTorch + Triton.

Never imports ComfyUI. The public API is re-exported here lazily, so importing
the package costs nothing until a function is used.
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "load_dit": "turbo_core.models.dit_loader",
    "WanDiT": "turbo_core.models.dit",
    "LoadReport": "turbo_core.models.dit_loader",
    "load_vae": "turbo_core.models.vae",
    "load_text_encoder": "turbo_core.models.umt5",
    "rcm_timesteps": "turbo_core.sampling.rcm",
    "rcm_sample": "turbo_core.sampling.rcm",
    "generate_t2v": "turbo_core.pipeline",
    "generate_i2v": "turbo_core.pipeline",
    "write_video": "turbo_core.io.video",
    "CheckpointError": "turbo_core.io.checkpoint",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'turbo_core' has no attribute {name!r}")
