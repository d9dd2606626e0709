"""Input specs and VALIDATE_INPUTS checks shared by several nodes.

ComfyUI calls VALIDATE_INPUTS before anything runs, so a bad value is refused with
HTTP 400 and a message naming the fix instead of failing halfway through a run.
Each check returns True or that message. Values wired from another node are not
known yet at validation time (they arrive as None) and are checked when the node runs.
The newest ComfyUI skips its own min/max checks for inputs VALIDATE_INPUTS takes,
so the ranges are checked here again.
"""
from __future__ import annotations

import os

MAX_SIZE = 4096
MAX_FRAMES = 1025


def size_inputs(width: int, height: int) -> dict:
    return {
        "width": ("INT", {"default": width, "min": 16, "max": MAX_SIZE, "step": 16,
                          "tooltip": "video width in pixels, a multiple of 16 (480p: 832, 720p: 1280)"}),
        "height": ("INT", {"default": height, "min": 16, "max": MAX_SIZE, "step": 16,
                           "tooltip": "video height in pixels, a multiple of 16 (480p: 480, 720p: 720)"}),
    }


def frames_input(default: int = 81) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": MAX_FRAMES, "step": 4,
                    "tooltip": "number of frames, 4k+1 (81 = 5 s at 16 fps); the VAE packs 4 frames per latent"})


def validate_video_size(width=None, height=None, num_frames=None):
    from turbo_core.sampling.sizes import validate_frames, validate_size

    problems = []
    if width is not None and height is not None:
        if max(width, height) > MAX_SIZE:
            problems.append(f"width and height are at most {MAX_SIZE}")
        try:
            validate_size(width, height)
        except ValueError as err:
            problems.append(str(err))
    if num_frames is not None:
        try:
            validate_frames(num_frames)
            if num_frames > MAX_FRAMES:
                problems.append(f"num_frames is at most {MAX_FRAMES}")
        except ValueError as err:
            problems.append(str(err))
    return "; ".join(problems) if problems else True


def output_subpath_problem(filename_prefix: str, output_dir: str | None = None) -> str | None:
    """Why `filename_prefix` would write outside the output folder (None if it stays inside)."""
    if filename_prefix is None:
        return None
    if not filename_prefix.strip():
        return "filename_prefix is empty: give a name such as TurboDiffusion or videos/TurboDiffusion"
    if os.path.isabs(filename_prefix) or filename_prefix.startswith(("~", "\\")) or \
            (len(filename_prefix) > 1 and filename_prefix[1] == ":"):
        return (f"filename_prefix {filename_prefix!r} is an absolute path: give a name relative to the output "
                f"folder, such as videos/TurboDiffusion")
    base = os.path.abspath(output_dir or "/output")
    target = os.path.abspath(os.path.join(base, os.path.normpath(filename_prefix)))
    if os.path.commonpath([base, target]) != base or target == base:
        return (f"filename_prefix {filename_prefix!r} leaves the output folder: use a plain name or sub-folders "
                f"without '..', such as videos/TurboDiffusion")
    return None
