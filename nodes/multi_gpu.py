"""TurboDiffusion Multi-GPU: one video sampled on several GPUs (turbo_core.workers)."""
from __future__ import annotations

import functools

from .common import CATEGORY, MULTI_GPU, check_interrupt, log


class TurboDiffusionMultiGPU:
    """Samples on several GPUs at once: connect it to TurboSampler's multi_gpu input.

    One worker process per GPU loads the model files and keeps them loaded between
    prompts. Every GPU holds the whole model and computes a share of the video's tokens
    (sequence parallelism); the video is the one a single GPU makes. The number of GPUs must
    divide the model's attention heads (1.3B: 12, 14B: 40). "Free model and node cache"
    and quitting ComfyUI stop the workers."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "devices": ("STRING", {
                "default": "0,1",
                "tooltip": "the GPUs to use, by number: 0,1 or 0,1,2,3. Each gets a worker with its own copy of "
                           "the model. cpu,cpu runs the workers on the CPU (for trying it out; slow)"}),
        }}

    RETURN_TYPES = (MULTI_GPU,)
    RETURN_NAMES = ("multi_gpu",)
    OUTPUT_TOOLTIPS = ("for TurboSampler's multi_gpu input",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    @classmethod
    def VALIDATE_INPUTS(cls, devices=None):
        if devices is None:
            return True
        from turbo_core.workers import parse_devices

        try:
            parse_devices(devices)
        except ValueError as err:
            return str(err)
        return True

    def configure(self, devices):
        from turbo_core.workers import parse_devices

        return ({"devices": [str(d) for d in parse_devices(devices)]},)


def sample_on_workers(multi_gpu: dict, experts, context, *, on_step, **kwargs):
    """TurboSampler's run on the worker group (started on first use, kept between prompts)."""
    from turbo_core.workers import ModelFile, get_group

    _stop_workers_with_comfy()
    files = [ModelFile.of(m) for m in experts]
    group = get_group(multi_gpu["devices"])
    log.info("TurboDiffusion multi-GPU: sampling on %s", ", ".join(multi_gpu["devices"]))
    return group.sample(files, context, on_step=on_step, poll=check_interrupt, **kwargs)


def _stop_workers_with_comfy() -> None:
    """Stop the workers whenever ComfyUI unloads all its models: "Free model and node cache",
    an out-of-memory error, --disable-smart-memory. ComfyUI has no event for that, so its
    unload_all_models is wrapped, once. (soft_empty_cache is not: ComfyUI calls it after
    every prompt, and keeping the models between prompts is the point of the workers.)
    The workers also stop when ComfyUI exits (atexit) or dies (they watch their parent)."""
    import comfy.model_management as mm

    if getattr(mm.unload_all_models, "stops_turbo_workers", False):
        return
    from turbo_core.workers import shutdown_all

    original = mm.unload_all_models

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        shutdown_all()
        return original(*args, **kwargs)

    unload_all_models.stops_turbo_workers = True
    mm.unload_all_models = unload_all_models
