"""The one place where the engine's latent meets ComfyUI's.

The engine works on the *normalised* Wan2.1 latent, (mu - mean) / std per channel,
which is what the DiT is trained on. ComfyUI's LATENT for Wan models holds the
*un-normalised* VAE mean mu (its `latent_formats.Wan21` applies the same statistics
on the way in and out of a model), so native VAEDecode, latent upscalers and savers
all expect that. Both are [B, 16, T, H/8, W/8].
"""
from __future__ import annotations

import torch

from .models.vae import LATENT_MEAN, LATENT_STD


def _stats(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if latent.ndim != 5 or latent.shape[1] != len(LATENT_MEAN):
        raise ValueError(f"a Wan2.1 latent is [B, {len(LATENT_MEAN)}, T, H/8, W/8], got shape {tuple(latent.shape)}")
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=latent.device).view(shape)
    std = torch.tensor(LATENT_STD, dtype=torch.float32, device=latent.device).view(shape)
    return mean, std


def to_comfy(latent: torch.Tensor) -> torch.Tensor:
    """Engine (normalised) -> ComfyUI LATENT samples (un-normalised), float32."""
    mean, std = _stats(latent)
    return latent.float() * std + mean


def from_comfy(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples (un-normalised) -> engine (normalised), float32."""
    mean, std = _stats(samples)
    return (samples.float() - mean) / std
