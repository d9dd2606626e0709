"""Tiny random models in the real checkpoint layouts, for the demo and the tests.

The weights are random (W ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), modulation
~ N(0, 0.5^2), norm weights ~ 1 + N(0, 0.1^2)) so every component changes the
output; they generate noise-like video, never anything meaningful.
"""
from __future__ import annotations

import torch

from .quant.int8 import quantize_int8

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def tiny_dit_state_dict(*, dim: int = 256, layers: int = 2, ffn_dim: int = 512, in_dim: int = 16,
                        text_dim: int = 64, freq_dim: int = 256, sla: bool = True, seed: int = 0,
                        dtype=torch.bfloat16, device=None) -> dict[str, torch.Tensor]:
    """A TurboWan-layout DiT state dict (bare keys, Linear patch embedding, SLA proj_l).

    device: where to draw the weights (full-size models for GPU benchmarks are made on the GPU).
    """
    g = torch.Generator(device or "cpu").manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, device=device) * std + mean).to(dtype)

    sd: dict[str, torch.Tensor] = {}

    def linear(name, d_in, d_out):
        sd[f"{name}.weight"] = randn(d_out, d_in, std=d_in ** -0.5)
        sd[f"{name}.bias"] = randn(d_out, std=0.1)

    linear("patch_embedding", in_dim * 4, dim)
    linear("text_embedding.0", text_dim, dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", freq_dim, dim)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", dim, 6 * dim)
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "modulation"] = randn(1, 6, dim, std=0.5)
        for name in BLOCK_LINEARS:
            d_in = ffn_dim if name == "ffn.2" else dim
            d_out = ffn_dim if name == "ffn.0" else dim
            linear(p + name, d_in, d_out)
        for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"):
            sd[p + norm + ".weight"] = randn(dim, std=0.1, mean=1.0).float()  # fp32 buffers, as upstream
        sd[p + "norm3.weight"] = randn(dim, std=0.1, mean=1.0).float()
        sd[p + "norm3.bias"] = randn(dim, std=0.1).float()
        if sla:
            linear(p + "self_attn.attn_op.local_attn.proj_l", 128, 128)
    sd["head.modulation"] = randn(1, 2, dim, std=0.5)
    linear("head.head", dim, 4 * 16)
    return sd


def quantize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TurboWan -quant layout: each block linear's weight -> int8_weight + tile scale."""
    out = dict(sd)
    for key in list(sd):
        if key.startswith("blocks.") and key.endswith(".weight") and \
                any(key.endswith(f".{n}.weight") for n in BLOCK_LINEARS):
            q, s = quantize_int8(out.pop(key))
            out[key[: -len("weight")] + "int8_weight"] = q
            out[key[: -len("weight")] + "scale"] = s
    return out


def comfy_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan / Comfy-Org layout: prefixed keys, Conv3d patch embedding, no proj_l."""
    out = {}
    for key, value in sd.items():
        if ".proj_l." in key:
            continue
        if key == "patch_embedding.weight":
            value = value.reshape(value.shape[0], -1, 1, 2, 2)
        out["model.diffusion_model." + key] = value
    return out


def tiny_vae_state_dict(*, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Wan2.1-layout VAE with `dim` base channels (the real one has 96), random weights."""
    from .models.vae import VAEConfig, WanVAE

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in WanVAE(VAEConfig(dim=dim)).state_dict().items()}


def tiny_umt5_state_dict(tokenizer_model: bytes, *, dim: int = 64, layers: int = 2, heads: int = 4,
                         ffn: int = 128, vocab: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """An umT5-layout encoder (Wan names) that embeds its sentencepiece tokenizer as `spiece_model`,
    the way Comfy-Org's text encoder files carry it."""
    from .models.umt5 import UMT5Config, UMT5Encoder

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab, dim=dim, dim_attn=dim, num_heads=heads, dim_ffn=ffn, num_layers=layers)
    sd = {k: v.contiguous() for k, v in UMT5Encoder(cfg).state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(tokenizer_model), dtype=torch.uint8)
    return sd


def write_tiny_models(folder, *, text_dim: int = 64, i2v: bool = False, seed: int = 0) -> dict[str, str]:
    """Real model files in ComfyUI's folder layout; returns {"dit", ["dit_low"], "vae", "text_encoder"} paths.

    The DiT is a TurboWan .pth (the experts' files for I2V), the VAE and text encoder
    are .safetensors, the text encoder with its tokenizer embedded.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    from .models.tokenizer import train_tiny_sentencepiece

    dirs = {name: os.path.join(folder, name) for name in ("diffusion_models", "vae", "text_encoders")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    paths = {}
    if i2v:
        for n, expert in enumerate(("high", "low")):
            paths["dit" if expert == "high" else "dit_low"] = p = os.path.join(
                dirs["diffusion_models"], f"tiny-i2v-{expert}.pth")
            torch.save(tiny_dit_state_dict(in_dim=36, text_dim=text_dim, seed=seed + n), p)
    else:
        paths["dit"] = p = os.path.join(dirs["diffusion_models"], "tiny-t2v.pth")
        torch.save(tiny_dit_state_dict(text_dim=text_dim, seed=seed), p)
    paths["vae"] = p = os.path.join(dirs["vae"], "tiny-vae.safetensors")
    save_file(tiny_vae_state_dict(seed=seed), p)
    with tempfile.TemporaryDirectory() as tmp:
        spm = train_tiny_sentencepiece(tmp).read_bytes()
    paths["text_encoder"] = p = os.path.join(dirs["text_encoders"], "tiny-umt5.safetensors")
    save_file(tiny_umt5_state_dict(spm, dim=text_dim, seed=seed), p)
    return paths
