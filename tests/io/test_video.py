"""Video writing: every format round-trips frame count, size and fps; odd sizes; input kinds."""
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

from turbo_core.io.video import (
    DEFAULT_QUALITY, VIDEO_FORMATS, quality_value, read_video_info, resolve_format, to_uint8_frames, write_video,
)


def frames(f=5, h=32, w=48):
    """Random-ish, non-zero frames in ComfyUI IMAGE layout: a moving gradient plus noise."""
    g = torch.Generator().manual_seed(1)
    y = torch.linspace(0, 1, h)[:, None, None]
    x = torch.linspace(0, 1, w)[None, :, None]
    out = []
    for i in range(f):
        base = torch.cat([x.expand(h, w, 1), y.expand(h, w, 1), torch.full((h, w, 1), i / f)], -1)
        out.append((base + 0.1 * torch.rand(h, w, 3, generator=g)).clamp(0, 1))
    return torch.stack(out)


def pillow_frames(path):
    with Image.open(path) as im:
        return im.n_frames, im.size


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_av_formats_round_trip(tmp_path, fmt):
    path = write_video(frames(), tmp_path / f"clip.{fmt}", fps=16)
    assert path == str(tmp_path / f"clip.{fmt}")
    assert read_video_info(path) == {"frames": 5, "width": 48, "height": 32, "fps": 16.0}
    with av.open(path) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == {"mp4": "h264", "webm": "vp9"}[fmt]
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert s.codec_context.pix_fmt == "yuv420p"
    assert len(decoded) == 5
    # default quality should be visually close to the input
    err = np.abs(decoded[2].astype(float) - to_uint8_frames(frames())[2].astype(float)).mean()
    assert err < 12, err


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_pillow_formats_round_trip(tmp_path, fmt):
    path = write_video(frames(), tmp_path / f"clip.{fmt}", fps=16)
    assert pillow_frames(path) == (5, (48, 32))
    with Image.open(path) as im:
        assert im.info.get("loop") == 0  # loop forever
    info = read_video_info(path)
    assert info["frames"] == 5 and abs(info["fps"] - 16) < 1


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_long_clip_timestamps(tmp_path, fmt):
    # x264 buffers ~40 frames before the first packet; frames sent after the muxer has
    # written its header must still get increasing timestamps.
    path = write_video(frames(64, 16, 16), tmp_path / f"long.{fmt}", fps=16)
    with av.open(path) as c:
        s = c.streams.video[0]
        pts = [f.pts * f.time_base for f in c.decode(s)]
    assert len(pts) == 64
    assert pts == sorted(pts) and len(set(pts)) == 64
    assert abs(float(pts[-1]) - 63 / 16) < 1e-3


def test_mp4_faststart(tmp_path):
    data = open(write_video(frames(), tmp_path / "a.mp4"), "rb").read()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


@pytest.mark.parametrize("fmt", list(VIDEO_FORMATS))
def test_odd_size(tmp_path, fmt):
    path = write_video(frames(3, 17, 33), tmp_path / f"odd.{fmt}")
    if VIDEO_FORMATS[fmt]["pix_fmt"] == "yuv420p":
        info = read_video_info(path)
        assert (info["frames"], info["width"], info["height"]) == (3, 34, 18)  # one replicated row/col
    else:
        assert pillow_frames(path) == (3, (33, 17))


def test_uint8_inputs_and_explicit_format(tmp_path):
    u8 = to_uint8_frames(frames())
    assert u8.dtype == np.uint8 and u8.shape == (5, 32, 48, 3) and u8.max() > 0
    p1 = write_video(u8, tmp_path / "np.mp4")
    p2 = write_video(torch.from_numpy(u8), tmp_path / "noext", format="webm")
    assert read_video_info(p1)["frames"] == 5
    assert read_video_info(p2)["frames"] == 5
    with av.open(p2) as c:
        assert "webm" in c.format.name or "matroska" in c.format.name


def test_float_to_uint8_conversion():
    f = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    assert to_uint8_frames(f).tolist() == [[[[0, 128, 255]]]]
    assert to_uint8_frames(torch.full((1, 2, 2, 3), 2.0)).max() == 255  # clipped


def test_bad_format_lists_supported(tmp_path):
    with pytest.raises(ValueError, match="mp4, webm, gif, webp"):
        write_video(frames(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="mp4, webm, gif, webp"):
        write_video(frames(), tmp_path / "clip.mp4", format="mkv")
    assert resolve_format("x.MP4") == "mp4" and resolve_format("x", ".webp") == "webp"


def test_bad_frames_and_quality(tmp_path):
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(torch.rand(2, 3, 8, 8), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="quality"):
        write_video(frames(), tmp_path / "x.mp4", quality=101)
    assert not (tmp_path / "x.mp4").exists()


def test_quality_mapping(tmp_path):
    assert quality_value("mp4", 80) == 19 and quality_value("mp4", 0) == 51
    assert quality_value("webp", 80) == 80 and quality_value("gif", 50) is None
    lo = write_video(frames(), tmp_path / "lo.mp4", quality=20)
    hi = write_video(frames(), tmp_path / "hi.mp4", quality=100)
    assert (tmp_path / "hi.mp4").stat().st_size > (tmp_path / "lo.mp4").stat().st_size
    assert lo and hi
    # None = the default quality: the encoder gets the same settings (x264 writes them into the
    # stream). Not the bytes: two encodes of the same frames can differ here (seen ~1 in 6 runs).
    dflt = write_video(frames(), tmp_path / "d.mp4", quality=None)
    explicit = write_video(frames(), tmp_path / "e.mp4", quality=DEFAULT_QUALITY)
    settings = [re.search(rb"options: [^\x00]+", open(p, "rb").read()).group(0) for p in (dflt, explicit)]
    assert settings[0] == settings[1] and b"crf=19.0" in settings[0]


def test_formats_are_data():
    for name, spec in VIDEO_FORMATS.items():
        assert spec["extension"] == "." + name
        assert spec["mime"].split("/")[0] in ("video", "image")
        assert {"container", "codec", "pix_fmt"} <= set(spec)
