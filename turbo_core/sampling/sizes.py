"""Video sizes the Wan VAE + DiT accept: frame counts, pixel sizes, presets.

The VAE compresses time by 4 (causally: the first frame alone, then groups of 4)
and space by 8, and the DiT patchifies the latent by 2x2, so frame counts must be
4k+1 and width/height multiples of 16.
"""
from __future__ import annotations

import math

LATENT_CHANNELS = 16
TIME_STRIDE = 4
SPACE_STRIDE = 8  # VAE only
SIZE_MULTIPLE = 16  # VAE stride x DiT patch

# (width, height) per preset and aspect ratio, as in upstream VIDEO_RES_SIZE_INFO.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "4:3": (640, 480), "3:4": (480, 640), "1:1": (640, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (960, 720), "3:4": (720, 960), "1:1": (960, 960)},
}


def validate_frames(num_frames: int) -> int:
    """Number of latent frames for `num_frames` video frames (which must be 4k+1)."""
    n = int(num_frames)
    if n != num_frames:
        raise ValueError(f"num_frames must be an integer, got {num_frames!r}")
    if n < 1:
        raise ValueError(f"{n} frames: use at least 1 (frame counts are 4k+1: 1, 5, 9, ..., 81)")
    if (n - 1) % TIME_STRIDE:
        lo = (n - 1) // TIME_STRIDE * TIME_STRIDE + 1
        raise ValueError(f"{n} frames: use {lo} or {lo + TIME_STRIDE} (frame counts must be 4k+1, e.g. 81)")
    return 1 + (n - 1) // TIME_STRIDE


def _size_problem(name: str, v: int) -> str | None:
    if v >= SIZE_MULTIPLE and v % SIZE_MULTIPLE == 0:
        return None
    if v < SIZE_MULTIPLE:
        return f"{name} {v}: use {SIZE_MULTIPLE}"
    lo = v // SIZE_MULTIPLE * SIZE_MULTIPLE
    return f"{name} {v}: use {lo} or {lo + SIZE_MULTIPLE}"


def validate_size(width: int, height: int) -> tuple[int, int]:
    """Check that both sides are multiples of 16 (>= 16); returns (width, height)."""
    w, h = int(width), int(height)
    problems = [p for p in (_size_problem("width", w), _size_problem("height", h)) if p]
    if problems:
        raise ValueError("; ".join(problems) + f" (width and height must be multiples of {SIZE_MULTIPLE})")
    return w, h


def latent_shape(batch: int, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(B, 16, T_lat, H/8, W/8) of the latent for a video of that size."""
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    t_lat = validate_frames(num_frames)
    w, h = validate_size(width, height)
    return (int(batch), LATENT_CHANNELS, t_lat, h // SPACE_STRIDE, w // SPACE_STRIDE)


def adaptive_size(image_w: int, image_h: int, preset_w: int, preset_h: int) -> tuple[int, int]:
    """(w, h) with about the preset's area and the image's aspect ratio, multiples of 16.

    Same rule as upstream --adaptive_resolution (round half to even of size/16);
    unlike upstream, a side never rounds down to 0 for extreme aspect ratios.
    """
    if min(image_w, image_h, preset_w, preset_h) <= 0:
        raise ValueError("image and preset sizes must be positive")
    area = preset_w * preset_h
    aspect = image_h / image_w
    w = round(math.sqrt(area / aspect) / SIZE_MULTIPLE)
    h = round(math.sqrt(area * aspect) / SIZE_MULTIPLE)
    return max(w, 1) * SIZE_MULTIPLE, max(h, 1) * SIZE_MULTIPLE
