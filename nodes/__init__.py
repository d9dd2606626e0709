"""ComfyUI adapters: inputs -> one turbo_core call -> outputs. No math here.

Custom types between the pack's nodes (see common.py): TURBO_DIT, TURBO_VAE,
TURBO_TEXT_ENCODER, TURBO_I2V, TURBO_MULTI_GPU. Everything else is ComfyUI's own: CONDITIONING,
LATENT (Wan convention, un-normalised), IMAGE.
"""
from .common import ensure_engine, register_model_folders
from .conditioning import TurboDiffusionImageToVideo, TurboDiffusionTextEncode
from .loaders import TurboDiffusionModelLoader, TurboDiffusionUMT5Loader, TurboDiffusionVAELoader
from .multi_gpu import TurboDiffusionMultiGPU
from .sampler import TurboSampler
from .video import TurboDiffusionSaveVideo, TurboDiffusionVAEDecode

ensure_engine()  # `import turbo_core` inside the nodes resolves to this pack's engine (cheap: no torch)
register_model_folders()  # diffusion_models / text_encoders in the 2024 ComfyUI too

NODE_CLASS_MAPPINGS = {
    "TurboDiffusionModelLoader": TurboDiffusionModelLoader,
    "TurboDiffusionVAELoader": TurboDiffusionVAELoader,
    "TurboDiffusionUMT5Loader": TurboDiffusionUMT5Loader,
    "TurboDiffusionTextEncode": TurboDiffusionTextEncode,
    "TurboDiffusionImageToVideo": TurboDiffusionImageToVideo,
    "TurboSampler": TurboSampler,
    "TurboDiffusionMultiGPU": TurboDiffusionMultiGPU,
    "TurboDiffusionVAEDecode": TurboDiffusionVAEDecode,
    "TurboDiffusionSaveVideo": TurboDiffusionSaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TurboDiffusionModelLoader": "TurboDiffusion Model Loader",
    "TurboDiffusionVAELoader": "TurboDiffusion VAE Loader",
    "TurboDiffusionUMT5Loader": "TurboDiffusion umT5 Loader",
    "TurboDiffusionTextEncode": "TurboDiffusion Text Encode",
    "TurboDiffusionImageToVideo": "TurboDiffusion Image To Video",
    "TurboSampler": "TurboSampler",
    "TurboDiffusionMultiGPU": "TurboDiffusion Multi-GPU",
    "TurboDiffusionVAEDecode": "TurboDiffusion VAE Decode",
    "TurboDiffusionSaveVideo": "TurboDiffusion Save Video",
}
