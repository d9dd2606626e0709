"""Helpers for the ComfyUI tests: the shipped API workflows, pointed at the tiny models."""
from __future__ import annotations

import json

from comfyui.server import REPO

# API-format prompts. The UI graphs one folder up are what the newest frontend lists as templates.
WORKFLOWS = REPO / "workflows" / "api"

# The example workflows' real model files -> the tiny files server.py writes.
TINY_NAMES = {
    "TurboWan2.1-T2V-1.3B-480P.pth": "tiny_t2v.safetensors",
    "TurboWan2.2-I2V-A14B-high-720P-quant.pth": "tiny_i2v_high.safetensors",
    "TurboWan2.2-I2V-A14B-low-720P-quant.pth": "tiny_i2v_low.safetensors",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "tiny_umt5.safetensors",
    "wan_2.1_vae.safetensors": "tiny_wan_vae.safetensors",
}
MODEL_INPUTS = ("model_name", "text_encoder_name", "vae_name")


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def tiny_sets(prompt: dict, *, width=64, height=48, frames=9, steps=2) -> list[str]:
    """--set assignments that point a shipped API workflow at the tiny models and a tiny size."""
    sets = []
    for node_id, node in prompt.items():
        for key in MODEL_INPUTS:
            if key in node["inputs"]:
                sets.append(f"{node_id}.{key}={TINY_NAMES[node['inputs'][key]]}")
        if node["class_type"] in ("TurboSampler", "TurboDiffusionImageToVideo"):
            sets += [f"{node_id}.width={width}", f"{node_id}.height={height}", f"{node_id}.num_frames={frames}"]
        if node["class_type"] == "TurboSampler":
            sets.append(f"{node_id}.steps={steps}")
        if node["class_type"] == "TurboDiffusionUMT5Loader":
            sets.append(f"{node_id}.device=cpu")
    return sets


def tiny_prompt(name: str, **kw) -> dict:
    from turbo_core.client import apply_set

    prompt = load_api(name)
    for s in tiny_sets(prompt, **kw):
        apply_set(prompt, s)
    return prompt


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)
