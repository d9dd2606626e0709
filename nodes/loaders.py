"""Loader nodes: a file from a ComfyUI models folder -> a turbo_core model on the CPU.

Models wait on the CPU; the sampler, the text encoder and the VAE nodes move them
to the GPU only while they run, so a 14B DiT pair, umT5-XXL and the VAE never have
to share the card.
"""
from __future__ import annotations

from .common import CATEGORY, DIT, TEXT_ENCODER, VAE, compute_device, model_files, model_path

DTYPES = ["auto", "bf16", "fp16", "fp32"]


def _short_report(report) -> str:
    """The load report in a few lines for the node; the console gets the full one."""
    lines = [f"{report.variant}", f"{report.layout}, {report.loaded} tensors as {report.dtype}"]
    if report.missing:
        lines.append(f"{len(report.missing)} missing (neutral values)")
    if report.mismatched:
        lines.append(f"{len(report.mismatched)} shape mismatches (not loaded)")
    if report.unexpected:
        lines.append(f"{len(report.unexpected)} unexpected (ignored)")
    if report.absent_by_layout:
        lines.append("no SLA proj_l: use attention 'original'")
    return "\n".join(lines)


class TurboDiffusionModelLoader:
    """Loads a TurboWan / Wan2.1 / Wan2.2 diffusion model (DiT) from models/diffusion_models.

    Any layout loads: TurboWan .pth and -quant .pth (int8), official Wan and Comfy-Org
    .safetensors. What matches loads; the rest is reported (console and node). For
    Wan2.2 I2V A14B use two loaders: the high-noise and the low-noise expert."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_files("diffusion_models"), {
                "tooltip": "DiT file in models/diffusion_models (models/unet also works), e.g. "
                           "TurboWan2.1-T2V-1.3B-480P.pth or TurboWan2.2-I2V-A14B-high-720P-quant.pth"}),
            "weight_dtype": (DTYPES, {
                "default": "auto",
                "tooltip": "compute dtype of the non-int8 weights: auto = bf16 (what TurboWan was trained in); "
                           "fp16 for GPUs without bf16; fp32 only for exactness checks (2x memory). "
                           "int8 (-quant) weights stay int8."}),
        }}

    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("the diffusion model, for TurboSampler's model or low_noise_model input",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def load(self, model_name, weight_dtype="auto"):
        from turbo_core.models.dit_loader import load_dit

        # The loader logs the full report to the console (a warning when something did not load);
        # web/turbodiffusion.js shows the short one on the node.
        model = load_dit(model_path("diffusion_models", model_name), device="cpu", dtype=weight_dtype)
        return {"ui": {"text": [_short_report(model.load_report)]}, "result": (model,)}


class TurboDiffusionVAELoader:
    """Loads the Wan2.1 video VAE (16 latent channels) from models/vae: Wan2.1_VAE.pth or
    wan_2.1_vae.safetensors. Every TurboWan model uses it, Wan2.2 I2V A14B included."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (model_files("vae"), {
                "tooltip": "the Wan2.1 VAE in models/vae (Wan2.1_VAE.pth or wan_2.1_vae.safetensors); "
                           "the 48-channel Wan2.2 VAE is for TI2V-5B and is refused"}),
        }}

    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("the Wan2.1 VAE, for TurboDiffusion VAE Decode and Image To Video",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def load(self, vae_name):
        from turbo_core.models.vae import load_vae

        # bf16 where it will run on a GPU, fp32 on the CPU (as the reference does).
        dtype = "fp32" if compute_device().type == "cpu" else "bf16"
        return (load_vae(model_path("vae", vae_name), device="cpu", dtype=dtype),)


def _tokenizer_choices() -> list[str]:
    """"auto" plus every folder under models/text_encoders that holds a tokenizer file."""
    import os

    import folder_paths

    from turbo_core.models.tokenizer import TOKENIZER_FILES

    found = set()
    for root in folder_paths.get_folder_paths("text_encoders"):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if any(f in filenames for f in TOKENIZER_FILES):
                found.add(os.path.relpath(dirpath, root))
    return ["auto"] + sorted(found)


class TurboDiffusionUMT5Loader:
    """Loads the umT5-XXL text encoder from models/text_encoders: Comfy-Org's
    umt5_xxl_*.safetensors (tokenizer inside, fp8 ok) or Wan's models_t5_umt5-xxl-enc-bf16.pth
    (put spiece.model from google/umt5-xxl in a folder umt5-xxl/ beside it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (model_files("text_encoders"), {
                "tooltip": "umT5-XXL encoder in models/text_encoders (models/clip also works)"}),
            "tokenizer": (_tokenizer_choices(), {
                "default": "auto",
                "tooltip": "auto: the tokenizer inside the file, else spiece.model / tokenizer.json found "
                           "beside it (umt5-xxl/ folder); or pick a folder under models/text_encoders"}),
            "device": (["gpu", "cpu"], {
                "default": "gpu",
                "tooltip": "where prompts are encoded. gpu: fast; the encoder visits the GPU only while it "
                           "encodes. cpu: never touches the GPU (slow, for small cards)"}),
        }}

    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("umT5-XXL with its tokenizer, for TurboDiffusion Text Encode",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def load(self, text_encoder_name, tokenizer="auto", device="gpu"):
        import os

        import folder_paths

        from turbo_core.models.umt5 import load_text_encoder

        tok = None
        if tokenizer != "auto":
            tok = next((os.path.join(r, tokenizer) for r in folder_paths.get_folder_paths("text_encoders")
                        if os.path.isdir(os.path.join(r, tokenizer))), None)
            if tok is None:
                raise FileNotFoundError(f"tokenizer folder {tokenizer!r} is not under models/text_encoders")
        encoder = load_text_encoder(model_path("text_encoders", text_encoder_name), tokenizer=tok, device="cpu")
        encoder.run_on = "cpu" if device == "cpu" else "gpu"  # read by TurboDiffusion Text Encode
        return (encoder,)
