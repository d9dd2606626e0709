"""Tiny random model files in the real layouts, for a real ComfyUI to load (test-only).

All come from turbo_core.tiny (random weights, real key names and layouts); this
file only decides which files the test server's model folders hold.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT_DIM = 64  # the tiny umT5's width = the tiny DiTs' text_dim

FILES = {
    "t2v": "diffusion_models/tiny_t2v.safetensors",  # TurboWan layout (SLA proj_l), bf16
    "t2v_pth": "diffusion_models/tiny_t2v_comfy.pth",  # official Wan/Comfy layout, torch.save
    "i2v_high": "diffusion_models/tiny_i2v_high.safetensors",
    "i2v_low": "diffusion_models/tiny_i2v_low.safetensors",
    "vae": "vae/tiny_wan_vae.safetensors",
    "vae_in_dit_folder": "diffusion_models/tiny_wan_vae_not_a_dit.safetensors",  # for the refusal test
    "umt5": "text_encoders/tiny_umt5.safetensors",  # Wan layout with the tokenizer embedded
}


def write_tiny_models(root: Path) -> dict[str, Path]:
    """Write every file in FILES under `root` (ComfyUI models-folder names); returns name -> path."""
    from turbo_core.models.tokenizer import train_tiny_sentencepiece
    from turbo_core.tiny import comfy_state_dict, tiny_dit_state_dict, tiny_umt5_state_dict, tiny_vae_state_dict

    root = Path(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)

    t2v = tiny_dit_state_dict(text_dim=TEXT_DIM, seed=1)
    save_file(t2v, str(paths["t2v"]))
    torch.save(comfy_state_dict(t2v), str(paths["t2v_pth"]))
    save_file(tiny_dit_state_dict(text_dim=TEXT_DIM, in_dim=36, seed=2), str(paths["i2v_high"]))
    save_file(tiny_dit_state_dict(text_dim=TEXT_DIM, in_dim=36, seed=3), str(paths["i2v_low"]))

    vae = tiny_vae_state_dict()
    save_file(vae, str(paths["vae"]))
    save_file(vae, str(paths["vae_in_dit_folder"]))

    spm = train_tiny_sentencepiece(root / "_spm", vocab_size=256)
    save_file(tiny_umt5_state_dict(spm.read_bytes(), dim=TEXT_DIM), str(paths["umt5"]))
    return paths
