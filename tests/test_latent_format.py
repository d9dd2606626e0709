"""turbo_core.latent_format: the engine's normalised latent <-> ComfyUI's un-normalised Wan LATENT."""
import pytest
import torch

from turbo_core.latent_format import from_comfy, to_comfy
from turbo_core.models.vae import LATENT_MEAN, LATENT_STD, VAEConfig, WanVAE


def test_round_trip_and_per_channel_stats():
    x = torch.randn(2, 16, 3, 4, 6)
    assert torch.allclose(from_comfy(to_comfy(x)), x, atol=1e-6)
    zeros = to_comfy(torch.zeros(1, 16, 1, 1, 1)).flatten()
    assert torch.allclose(zeros, torch.tensor(LATENT_MEAN))
    ones = to_comfy(torch.ones(1, 16, 1, 1, 1)).flatten()
    assert torch.allclose(ones, torch.tensor(LATENT_MEAN) + torch.tensor(LATENT_STD))


def test_comfy_latent_is_the_vae_mean():
    """ComfyUI's Wan LATENT holds the VAE encoder's mu itself (its Wan21 latent format normalises later)."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latent = vae.encode(video)  # normalised
    cache = {}
    mu = [vae.conv1(vae.encoder(video[:, :, :1], cache))[:, :16],
          vae.conv1(vae.encoder(video[:, :, 1:5], cache))[:, :16]]
    assert torch.allclose(to_comfy(latent), torch.cat(mu, dim=2), atol=1e-5)


def test_refuses_other_latents():
    with pytest.raises(ValueError, match=r"\[B, 16, T, H/8, W/8\]"):
        to_comfy(torch.zeros(1, 4, 8, 8))
