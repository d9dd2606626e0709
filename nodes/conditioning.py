"""Conditioning nodes: prompt -> CONDITIONING, image -> the Wan2.2 I2V condition.

TurboDiffusion Text Encode gives ComfyUI's own CONDITIONING layout,
[[context [1, 512, 4096], {"pooled_output": None}]], so it mixes with native
conditioning nodes, and TurboSampler also takes the native CLIPTextEncode output
(umT5 loaded by CLIPLoader with type "wan"); see `context_from_conditioning`.
"""
from __future__ import annotations

from .common import CATEGORY, I2V, TEXT_ENCODER, VAE, compute_device, log, make_room, module_bytes, release
from .validation import frames_input, size_inputs, validate_video_size

TEXT_LEN = 512  # rows of context the official pipeline feeds the DiT


def context_from_conditioning(conditioning, text_dim: int):
    """CONDITIONING -> context [1, L>=512, text_dim] for the DiT.

    A shorter context (native CLIPTextEncode stops at the prompt's tokens) is zero-padded
    to 512 rows, exactly what the umT5 encoder feeds the DiT in the official pipeline.
    Only the first entry is used: rCM sampling has no use for area/strength extras.
    """
    import torch

    if not conditioning or not isinstance(conditioning[0], (list, tuple)) or not torch.is_tensor(conditioning[0][0]):
        raise ValueError("positive: expected a CONDITIONING (from TurboDiffusion Text Encode or CLIPTextEncode)")
    if len(conditioning) > 1:
        log.warning("TurboDiffusion: positive holds %d conditionings; using the first", len(conditioning))
    context = conditioning[0][0]
    if context.ndim == 2:
        context = context[None]
    if context.shape[-1] != text_dim:
        raise ValueError(
            f"positive: the conditioning has {context.shape[-1]} features per token but this model reads "
            f"{text_dim}: encode the prompt with umT5-XXL (TurboDiffusion umT5 Loader, or CLIPLoader with "
            f"type 'wan'), not with a CLIP/other text encoder")
    if context.shape[1] < TEXT_LEN:
        pad = context.new_zeros(context.shape[0], TEXT_LEN - context.shape[1], context.shape[2])
        context = torch.cat([context, pad], dim=1)
    return context


class TurboDiffusionTextEncode:
    """Encodes a prompt with umT5-XXL into the 512-token context TurboWan models read.
    No negative prompt: rCM models are distilled to sample without CFG."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "from TurboDiffusion umT5 Loader"}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "the prompt; up to 512 tokens are used (about 350 English words)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("ComfyUI CONDITIONING [1, 512, 4096] for TurboSampler's positive input",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def encode(self, text_encoder, text):
        import torch

        from turbo_core.pipeline import encode_prompts

        device = compute_device() if getattr(text_encoder, "run_on", "gpu") == "gpu" else torch.device("cpu")
        home = text_encoder.device
        if device != home:
            make_room(device, module_bytes(text_encoder.model))
            text_encoder.to(device)
        try:
            context = encode_prompts(text_encoder, text)  # [1, 512, dim]
        finally:
            if device != home:
                text_encoder.to(home)
                release()
        return ([[context.float().cpu(), {"pooled_output": None}]],)


class TurboDiffusionImageToVideo:
    """The Wan2.2 I2V condition from a start image: resized to width x height (or, with
    adaptive_resolution, to about that area at the image's aspect ratio), encoded by the
    VAE as the first frame of a num_frames video. TurboSampler takes its size from here."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "the Wan2.1 VAE (TurboDiffusion VAE Loader)"}),
            "image": ("IMAGE", {"tooltip": "start frame; the first image of a batch is used"}),
            **size_inputs(1280, 720),
            "num_frames": frames_input(),
            "adaptive_resolution": ("BOOLEAN", {
                "default": False,
                "tooltip": "on: keep the image's aspect ratio at about width x height pixels (multiples of 16), "
                           "as the official --adaptive_resolution; off: stretch to width x height"}),
        }}

    RETURN_TYPES = (I2V,)
    RETURN_NAMES = ("i2v",)
    OUTPUT_TOOLTIPS = ("image condition and video size, for TurboSampler's i2v input",)
    FUNCTION = "condition"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, num_frames=None):
        return validate_video_size(width, height, num_frames)

    def condition(self, vae, image, width, height, num_frames, adaptive_resolution=False):
        from turbo_core.pipeline import i2v_condition, image_to_tensor
        from turbo_core.sampling.sizes import adaptive_size

        problem = validate_video_size(width, height, num_frames)  # again: wired values, the 2024 ComfyUI
        if problem is not True:
            raise ValueError(problem)
        if adaptive_resolution:
            img = image_to_tensor(image)  # [3, h, w]
            width, height = adaptive_size(img.shape[2], img.shape[1], width, height)
        device = compute_device()
        home = vae.device
        if device != home:
            make_room(device, module_bytes(vae))
            vae.to(device)
        try:
            y = i2v_condition(vae, image, width=width, height=height, num_frames=num_frames)
        finally:
            if device != home:
                vae.to(home)
                release()
        return ({"y": y.float().cpu(), "width": width, "height": height, "num_frames": num_frames},)
