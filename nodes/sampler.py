"""TurboSampler: rCM few-step sampling of a TurboWan model -> ComfyUI LATENT."""
from __future__ import annotations

from .common import (CATEGORY, DIT, I2V, MULTI_GPU, check_interrupt, compute_device, log, make_room, module_bytes,
                     release)
from .conditioning import context_from_conditioning
from .validation import frames_input, size_inputs, validate_video_size

ATTENTION = ["sla", "sagesla", "original", "auto"]
NOISE_DEVICES = {"cpu": "cpu", "gpu": "model"}  # widget value -> turbo_core noise_device
SIGMA_MAX_DEFAULT = {False: 80.0, True: 200.0}  # T2V, I2V (the official scripts' defaults)


class TurboSampler:
    """Samples a video latent in 1-4 steps with a TurboWan (rCM-distilled) model.

    Text to video: model + positive. Image to video (Wan2.2 A14B): model = high-noise
    expert, low_noise_model = low-noise expert, i2v from TurboDiffusion Image To Video
    (which then sets the size and frame count). The output is a ComfyUI LATENT in the
    Wan convention [B, 16, T, H/8, W/8], so native VAEDecode and latent nodes take it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "TurboWan model (for Wan2.2 I2V: the high-noise expert)"}),
                "positive": ("CONDITIONING", {
                    "tooltip": "the prompt: TurboDiffusion Text Encode, or CLIPTextEncode with umT5 "
                               "(CLIPLoader type wan); padded to 512 tokens"}),
                **size_inputs(832, 480),
                "num_frames": frames_input(),
                "steps": ("INT", {"default": 4, "min": 1, "max": 4,
                                  "tooltip": "sampling steps; rCM is distilled for 1-4 (4 = best quality)"}),
                "attention_type": (ATTENTION, {
                    "default": "sla",
                    "tooltip": "sla: sparse-linear attention the TurboWan models were trained with (fast); "
                               "sagesla: SLA with int8/fp8 kernels (RTX 40xx/H100+, falls back to sla); "
                               "original: dense attention (exact, slow; for plain Wan files without SLA); "
                               "auto: the fastest this GPU supports"}),
                "sla_topk": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "fraction of key blocks SLA attends to: 0.1 (fast) to 0.15-0.2 "
                                                  "(better quality)"}),
                "sigma_max": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 1.0,
                                        "tooltip": "initial noise level; 0 = official default (80 for T2V, "
                                                   "200 for I2V)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "noise seed; the same seed, size and noise_device give the same video"}),
                "boundary": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "I2V: switch from the high- to the low-noise expert once the "
                                                  "noise time falls below this (official: 0.9)"}),
                "ode": ("BOOLEAN", {"default": False,
                                    "tooltip": "on: deterministic ODE (Euler) steps; off: rCM's stochastic steps "
                                               "(official default)"}),
                "noise_device": (list(NOISE_DEVICES), {
                    "default": "cpu",
                    "tooltip": "cpu: the same seed gives the same video on any machine; gpu: the random stream "
                               "of the official scripts (depends on the GPU)"}),
            },
            "optional": {
                "low_noise_model": (DIT, {"tooltip": "Wan2.2 I2V: the low-noise expert (recommended)"}),
                "i2v": (I2V, {"tooltip": "image condition from TurboDiffusion Image To Video (Wan2.2 I2V models)"}),
                "multi_gpu": (MULTI_GPU, {"tooltip": "from TurboDiffusion Multi-GPU: sample on several GPUs at once "
                                                     "(same result, less time per step)"}),
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile the transformer blocks: the first run at a new size compiles "
                               "(a minute or more); steps then take about as long as without it (within 2% on an H100: the eager "
                               "blocks already run fused kernels). Single GPU only"}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("video latent [B, 16, T, H/8, W/8] in ComfyUI's Wan convention",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, num_frames=None):
        # steps, sla_topk, ... are range-checked by ComfyUI itself (min/max above).
        return validate_video_size(width, height, num_frames)

    def sample(self, model, positive, width, height, num_frames, steps, attention_type, sla_topk, sigma_max,
               seed, boundary, ode, noise_device, low_noise_model=None, i2v=None, multi_gpu=None,
               compile=False):
        from turbo_core.latent_format import to_comfy
        from turbo_core.pipeline import sample_latent
        from turbo_core.sampling.sizes import latent_shape

        experts = [model] + ([low_noise_model] if low_noise_model is not None else [])
        is_i2v = model.config.is_i2v
        _check_experts(experts, i2v)
        if i2v is not None:
            if (width, height, num_frames) != (i2v["width"], i2v["height"], i2v["num_frames"]):
                log.info("TurboSampler: using the i2v condition's size %dx%d, %d frames",
                         i2v["width"], i2v["height"], i2v["num_frames"])
            width, height, num_frames = i2v["width"], i2v["height"], i2v["num_frames"]
        shape = latent_shape(1, num_frames, height, width)
        context = context_from_conditioning(positive, model.config.text_dim)

        import comfy.utils

        bar = comfy.utils.ProgressBar(steps)

        def on_step(step, total, x):
            bar.update_absolute(step + 1, total)
            check_interrupt()

        check_interrupt()
        run = dict(shape=shape, steps=steps, sigma_max=sigma_max or SIGMA_MAX_DEFAULT[is_i2v], seed=seed,
                   y=None if i2v is None else i2v["y"], boundary=boundary, ode=ode, attention=attention_type,
                   sla_topk=sla_topk, noise_device=NOISE_DEVICES[noise_device])
        if multi_gpu is not None:  # worker processes that keep their own copies of the models
            if compile:
                log.info("TurboSampler: compile applies to single-GPU sampling; the Multi-GPU workers run eager")
            from .multi_gpu import sample_on_workers

            latent = sample_on_workers(multi_gpu, experts, context, on_step=bar.update_absolute, **run)
            return ({"samples": to_comfy(latent).cpu()},)
        device = compute_device()
        make_room(device, module_bytes(*experts))
        for m in experts:  # a 14B step takes seconds: Cancel is honoured between blocks too
            m.between_blocks = check_interrupt
            if compile and not m.blocks_compiled:
                log.info("TurboSampler: compiling the blocks of %s (the first step at each size takes longer)",
                         m.config.variant)
                m.compile_blocks()
            elif not compile and m.blocks_compiled:
                m.uncompile_blocks()
        try:
            latent = sample_latent(experts, context, callback=on_step, device=device, **run)
        finally:
            for m in experts:
                m.between_blocks = None
            release()  # also after an error or an interrupt: the experts are back on the CPU by now
        return ({"samples": to_comfy(latent).cpu()},)


def _check_experts(experts, i2v) -> None:
    """Model / condition combinations that cannot work, with what to change."""
    kinds = {m.config.is_i2v for m in experts}
    names = " and ".join(m.config.variant for m in experts)
    if len(kinds) > 1:
        raise ValueError(f"model and low_noise_model must both be Wan2.2 I2V experts (got {names}): "
                         f"load the -high and -low I2V files")
    if kinds == {True} and i2v is None:
        raise ValueError(f"{names} is an image-to-video model: connect TurboDiffusion Image To Video to the i2v "
                         f"input, or load a T2V model")
    if kinds == {False} and i2v is not None:
        raise ValueError(f"{names} is a text-to-video model: disconnect i2v, or load the Wan2.2 I2V experts")
    if kinds == {False} and len(experts) > 1:
        raise ValueError("low_noise_model is for the Wan2.2 I2V experts: disconnect it for text-to-video")
