"""Writing generated frames to video files (mp4, webm, gif, webp) and reading basic info back.

Formats are described as data in VIDEO_FORMATS; the two writers (PyAV for real
video codecs, Pillow for animated images) read everything they need from there.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

# One quality knob, 0..100 (higher is better), mapped linearly per format onto
# (option, value at quality 0, value at quality 100). DEFAULT_QUALITY = 80 gives
# x264 crf 19, VP9 crf 25 and WebP quality 80: visually good at sane sizes.
DEFAULT_QUALITY = 80

VIDEO_FORMATS: dict[str, dict] = {
    "mp4": {
        "writer": "av", "container": "mp4", "codec": "libx264", "pix_fmt": "yuv420p",
        "extension": ".mp4", "mime": "video/mp4",
        "quality": ("crf", 51, 11),
        # faststart moves the index to the front so browsers can play while loading.
        "container_options": {"movflags": "+faststart"},
        "codec_options": {"preset": "medium"},
    },
    "webm": {
        "writer": "av", "container": "webm", "codec": "libvpx-vp9", "pix_fmt": "yuv420p",
        "extension": ".webm", "mime": "video/webm",
        "quality": ("crf", 63, 15),
        # b:v 0 turns crf into constant-quality mode; the rest keeps VP9 from being glacial.
        "container_options": {},
        "codec_options": {"b:v": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"},
    },
    "gif": {
        "writer": "pillow", "container": "gif", "codec": "gif", "pix_fmt": "pal8",
        "extension": ".gif", "mime": "image/gif",
        "quality": None,  # always a 256-colour adaptive palette per frame
    },
    "webp": {
        "writer": "pillow", "container": "webp", "codec": "libwebp", "pix_fmt": "rgb24",
        "extension": ".webp", "mime": "image/webp",
        "quality": ("quality", 0, 100),
    },
}


def _supported() -> str:
    return ", ".join(VIDEO_FORMATS)


def resolve_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The VIDEO_FORMATS key for `format`, or for the path's extension when format is None."""
    name = format if format is not None else os.path.splitext(os.fspath(path))[1]
    key = str(name).lower().lstrip(".")
    if key not in VIDEO_FORMATS:
        what = f"format {format!r}" if format is not None else f"extension of {os.fspath(path)!r}"
        raise ValueError(f"unsupported video {what}: use one of {_supported()}")
    return key


def quality_value(fmt: str, quality: float) -> int | None:
    """The codec setting (crf or quality) that the 0..100 knob maps to for `fmt`."""
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be between 0 and 100, got {quality}")
    spec = VIDEO_FORMATS[fmt]["quality"]
    if spec is None:
        return None
    _, worst, best = spec
    return int(round(worst + (best - worst) * quality / 100))


def to_uint8_frames(frames) -> np.ndarray:
    """[F,H,W,3] uint8 from a float 0..1 tensor/array (ComfyUI IMAGE) or uint8 data.

    A single [H,W,C] image becomes one frame; 1 channel is repeated, alpha is dropped.
    """
    if hasattr(frames, "detach"):  # torch tensor, possibly on a GPU
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            frames = frames.float()
        frames = frames.numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"frames must be [F, H, W, 3] (or 1/4 channels), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"frames must be float in 0..1 or uint8, got {arr.dtype}")
        arr = np.round(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _pad_even(arr: np.ndarray) -> np.ndarray:
    # yuv420p subsamples chroma 2x2, so x264/VP9 need even sizes: repeat the last
    # row/column once rather than crop, so no generated pixel is lost.
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return arr


def _fps_fraction(fps: float) -> Fraction:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(10000)  # 23.976 -> 2997/125, 16 -> 16


def _write_av(arr: np.ndarray, path: str, spec: dict, fps: float, qvalue: int | None) -> None:
    import av

    if spec["pix_fmt"] == "yuv420p":
        arr = _pad_even(arr)
    rate = _fps_fraction(fps)
    options = dict(spec.get("codec_options", {}))
    if qvalue is not None:
        options[spec["quality"][0]] = str(qvalue)
    with av.open(path, mode="w", format=spec["container"], options=dict(spec.get("container_options", {}))) as out:
        stream = out.add_stream(spec["codec"], rate=rate, options=options)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = spec["pix_fmt"]
        # Frame timestamps count frames. Use our own time base: the muxer rewrites
        # stream.time_base once the header is out (mp4: 1/16384), which would
        # squash every later pts to 0 if read from there.
        time_base = 1 / rate
        stream.codec_context.time_base = time_base
        for i, image in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush the encoder


def _write_pillow(arr: np.ndarray, path: str, spec: dict, fps: float, qvalue: int | None) -> None:
    from PIL import Image

    # GIF stores delays in 1/100 s, so 16 fps (62.5 ms) is written as 60 ms.
    # Consecutive identical frames (near-identical, for lossy WebP: libwebp's choice)
    # are stored as one longer frame, so n_frames can be below F; timing is kept.
    duration = max(1, round(1000 / fps))
    images = [Image.fromarray(image, "RGB") for image in arr]
    if spec["container"] == "gif":
        # fast octree + dithering: median cut takes ~1 s per noisy 480p frame
        images = [im.quantize(colors=256, method=Image.Quantize.FASTOCTREE) for im in images]
        extra = {"optimize": False}
    else:
        extra = {"quality": qvalue, "lossless": False, "method": 4}
    images[0].save(path, format=spec["container"].upper(), save_all=True, append_images=images[1:],
                   duration=duration, loop=0, **extra)


_WRITERS = {"av": _write_av, "pillow": _write_pillow}


def write_video(frames, path, *, fps: float = 16, format: str | None = None,
                quality: float | None = DEFAULT_QUALITY) -> str:
    """Write frames to `path` and return the path (as a string).

    frames: float [F,H,W,3] in 0..1 (ComfyUI IMAGE) or uint8, torch or numpy.
    format: a VIDEO_FORMATS key; default from the path's extension.
    quality: 0..100 (None: DEFAULT_QUALITY), mapped per VIDEO_FORMATS[fmt]["quality"]; gif ignores it.
    mp4/webm use yuv420p, so an odd width/height gets one edge-replicated row/column.
    """
    path = os.fspath(path)
    fmt = resolve_format(path, format)
    spec = VIDEO_FORMATS[fmt]
    qvalue = quality_value(fmt, DEFAULT_QUALITY if quality is None else quality)
    _fps_fraction(fps)
    arr = to_uint8_frames(frames)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        _WRITERS[spec["writer"]](arr, path, spec, float(fps), qvalue)
    except BaseException:
        # never leave a truncated file behind that looks like a finished video
        if os.path.exists(path):
            os.remove(path)
        raise
    return path


def read_video_info(path) -> dict:
    """{"frames", "width", "height", "fps"} of a video file.

    PyAV for real video containers; animated GIF/WebP (which FFmpeg does not decode
    reliably) through Pillow, with fps derived from the first frame's delay.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in (".gif", ".webp"):
        return _read_image_info(path)
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = stream.frames
        if not frames:  # matroska/webm headers carry no frame count: decode and count
            frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return {
            "frames": int(frames),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(rate) if rate else 0.0,
        }


def _read_image_info(path: str) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # WebP reports the frame delay only once a frame is decoded
        duration = im.info.get("duration") or 0
        return {
            "frames": getattr(im, "n_frames", 1),
            "width": im.width,
            "height": im.height,
            "fps": 1000.0 / duration if duration else 0.0,
        }
