"""Video nodes: LATENT -> IMAGE frames (VAE decode), IMAGE frames -> a video file."""
from __future__ import annotations

import os

from .common import CATEGORY, VAE, compute_device, make_room, module_bytes, release
from .validation import output_subpath_problem

TILING = ["off", "24GB", "12GB"]  # -> None, TILING_24GB, TILING_12GB


class TurboDiffusionVAEDecode:
    """Decodes a Wan video latent into frames with the Wan2.1 VAE. Tiling decodes in
    overlapping spatial tiles to fit small GPUs (720p on 12 GB), at a small cost in speed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "the Wan2.1 VAE (TurboDiffusion VAE Loader)"}),
            "samples": ("LATENT", {"tooltip": "video latent from TurboSampler (or any Wan latent)"}),
            "tiling": (TILING, {"default": "off",
                                "tooltip": "off: one piece (fastest, most memory); 24GB: 512 px tiles (720p on "
                                           "24 GB cards); 12GB: 256 px tiles (720p on 12 GB, 480p on 8 GB)"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("the frames [F, H, W, 3] in 0..1, for any image or video node",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def decode(self, vae, samples, tiling="off"):
        from turbo_core.latent_format import from_comfy
        from turbo_core.models.vae import TILING_12GB, TILING_24GB
        from turbo_core.pipeline import decode_latent

        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[1] != 16:
            raise ValueError(f"samples: expected a Wan video latent [B, 16, T, H/8, W/8], got {tuple(latent.shape)}; "
                             f"image latents of other models cannot be decoded by the Wan VAE")
        tile = {"off": None, "24GB": TILING_24GB, "12GB": TILING_12GB}[tiling]
        device = compute_device()
        home = vae.device
        if device != home:
            make_room(device, module_bytes(vae))
            vae.to(device)
        try:
            frames = decode_latent(vae, from_comfy(latent), tile=tile)  # [B, F, H, W, 3]
        finally:
            if device != home:
                vae.to(home)
            release()
        return (frames.reshape(-1, *frames.shape[2:]),)  # a batch of videos -> one frame list


def _video_formats():
    from turbo_core.io.video import VIDEO_FORMATS

    return VIDEO_FORMATS


class TurboDiffusionSaveVideo:
    """Saves frames as a video (mp4, webm) or an animated image (gif, webp) in ComfyUI's
    output folder, named like ComfyUI's images (prefix_00001_.mp4), and shows it in the node."""

    @classmethod
    def INPUT_TYPES(cls):
        from turbo_core.io.video import DEFAULT_QUALITY

        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "the frames, in order"}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                                  "tooltip": "frames per second (Wan models: 16)"}),
                "format": (list(_video_formats()), {
                    "default": "mp4",
                    "tooltip": "mp4 (H.264, plays everywhere), webm (VP9), gif (256 colours), webp (animated)"}),
                "quality": ("INT", {"default": DEFAULT_QUALITY, "min": 0, "max": 100,
                                    "tooltip": "0-100, higher is better and larger (mp4/webm crf, webp quality; "
                                               "ignored for gif)"}),
                "filename_prefix": ("STRING", {
                    "default": "TurboDiffusion",
                    "tooltip": "file name start; may contain sub-folders (videos/TurboDiffusion) but never leave "
                               "the output folder. %width% and %height% are replaced"}),
            },
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        import folder_paths

        return output_subpath_problem(filename_prefix, folder_paths.get_output_directory()) or True

    def save(self, images, fps, format, quality, filename_prefix):
        import folder_paths

        from turbo_core.io.video import write_video

        output_dir = folder_paths.get_output_directory()
        problem = output_subpath_problem(filename_prefix, output_dir)
        if problem:
            raise ValueError(problem)
        if images.ndim == 3:
            images = images[None]
        frames, height, width = images.shape[0], images.shape[1], images.shape[2]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, width, height)
        spec = _video_formats()[format]
        file = f"{name}_{counter:05}_{spec['extension']}"
        os.makedirs(folder, exist_ok=True)
        write_video(images, os.path.join(folder, file), fps=fps, format=format, quality=quality)
        entry = {"filename": file, "subfolder": subfolder, "type": "output", "format": spec["mime"],
                 "frame_rate": fps, "frame_count": frames, "width": width, "height": height}
        return {"ui": {"videos": [entry]}}
