"""The Wan2.1 video VAE (16 latent channels), used by every TurboWan model.

Video [B, 3, F, H, W] in [-1, 1]  <->  normalised latent [B, 16, 1 + (F-1)/4, H/8, W/8].

The network is causal in time: every 3-tap temporal convolution only looks at the
current and the two previous frames. Encoding runs the encoder on frame chunks of
1, 4, 4, ... frames and decoding runs the decoder one latent frame at a time; a
per-call cache carries the last frames each causal convolution saw into the next
chunk. Done this way the result is the same as the reference implementation
(thu-ml/TurboDiffusion `rcm/tokenizers/wan2pt1.py`, itself the official Wan code),
and memory stays bounded by one chunk of activations.

Module names follow the official checkpoint (`Wan2.1_VAE.pth`, ComfyUI's
`wan_2.1_vae.safetensors`): 194 tensors that load 1:1 with `load_state_dict`.

Public API:
    load_vae(path, *, device=None, dtype=None) -> WanVAE
    WanVAE.encode(video, tile=None) -> latent      (float32, normalised)
    WanVAE.decode(latent, tile=None) -> video      (float32, about [-1, 1], not clamped)
    Tiling(tile_h, tile_w, overlap), TILING_24GB, TILING_12GB, DEFAULT_TILING

encode/decode run under torch.inference_mode(), so they return inference tensors:
fine to read anywhere, but clone one before changing it in place outside that mode.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from turbo_core.io.checkpoint import CheckpointError, guess_kind, read_state_dict

__all__ = [
    "LATENT_MEAN", "LATENT_STD", "VAEConfig", "WanVAE", "Tiling",
    "TILING_24GB", "TILING_12GB", "DEFAULT_TILING", "load_vae", "infer_config",
]

# Per-channel statistics of the Wan2.1 latent space; encode returns (mu - mean) / std.
LATENT_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENT_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

WAN22_VAE_MESSAGE = (
    "this is the Wan2.2 VAE (48 channels, for TI2V-5B); TurboWan models use the Wan2.1 VAE "
    "(Wan2.1_VAE.pth / wan_2.1_vae.safetensors)"
)

# A causal cache maps each causal layer to what it must remember between chunks.
# One is made per encode/decode call (per tile when tiling) and dropped at its end.
Cache = dict


# ---------------------------------------------------------------------------
# Building blocks

def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D (image) op to every frame of a [B, C, T, H, W] video."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
    return y.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded only on the past side in time.

    Spatial padding is symmetric. With a cache, the frames this layer saw at the
    end of the previous chunk replace the zero padding, so processing a video in
    chunks gives the same result as processing it in one go.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.past = 2 * pt  # frames of history each output needs
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        pad_t = self.past
        if cache is not None and pad_t:
            prev = cache.get(self)
            # Remember the last `past` input frames for the next chunk; a 1-frame
            # chunk borrows the newest remembered frame to make up the count.
            keep = x[:, :, -pad_t:]
            if prev is not None and keep.shape[2] < pad_t:
                keep = torch.cat([prev[:, :, keep.shape[2] - pad_t:], keep], dim=2)
            cache[self] = keep.clone()  # clone: a view would pin the whole chunk
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                pad_t -= prev.shape[2]
        x = F.pad(x, (*self.space_pad, pad_t, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (no bias)."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as the reference so bf16 rounding matches.
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1x1 projection on the skip path when the width changes."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        # Index layout is fixed by the checkpoint: norms at 0 and 3, convs at 2 and 6
        # (slot 5 held a dropout layer in training; it is an identity at inference).
        self.residual = nn.Sequential(
            RMSNorm(in_ch), nn.SiLU(), CausalConv3d(in_ch, out_ch, 3, padding=1),
            RMSNorm(out_ch), nn.SiLU(), nn.Identity(), CausalConv3d(out_ch, out_ch, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        r = self.residual
        skip = self.shortcut(x)
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[4](r[3](x)), cache)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape  # n = B*T frames
        # contiguous() first: the SDPA kernel, hence bf16 rounding, depends on the strides.
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()  # [n, h*w, 3c]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [n, 1, h*w, c]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.proj(y)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


class Resample(nn.Module):
    """2x spatial down/upsampling, optionally with 2x in time.

    `resample` holds the per-frame 2-D part (index 1 is the conv, as in the checkpoint);
    `time_conv` exists only for the temporal modes.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            # Halves the width: the next level starts from dim // 2 channels.
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:
            # Pad right/bottom only, then a stride-2 conv: H -> ceil(H/2).
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            # Emits two frames per input frame, stacked along channels.
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            # Stride 2 over [previous frame, 2 new frames]; no padding, history comes from the cache.
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self not in cache:
                # The very first latent frame maps to a single video frame:
                # skip the time conv and start its history from zeros.
                cache[self] = True
            else:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache)  # [B, 2C, T, H, W]
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

        x = _per_frame(self.resample, x)

        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                # The first frame passes through alone; later frames are merged in pairs.
                x = self.time_conv(torch.cat([prev, x], dim=2))  # [B, C, T/2, H, W]
        return x


# ---------------------------------------------------------------------------
# Encoder and decoder

@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


def _mid_block(ch: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(ch, ch), AttentionBlock(ch), ResidualBlock(ch, ch))


def _head(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(ch), nn.SiLU(), CausalConv3d(ch, out_ch, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    return head[2](head[1](head[0](x)), cache)


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in cfg.dim_mult]
        self.conv1 = CausalConv3d(3, cfg.dim, 3, padding=1)
        layers, ch = [], cfg.dim
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers.append(Resample(ch, "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _mid_block(ch)
        self.head = _head(ch, cfg.z_dim * 2)  # mean and log-variance

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in reversed(cfg.dim_mult)]
        temporal_up = list(reversed(cfg.temporal_downsample))
        ch = widths[0]
        self.conv1 = CausalConv3d(cfg.z_dim, ch, 3, padding=1)
        self.middle = _mid_block(ch)
        layers = []
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers.append(Resample(ch, "upsample3d" if temporal_up[level] else "upsample2d"))
                ch //= 2
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(ch, 3)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


# ---------------------------------------------------------------------------
# Spatial tiling

@dataclass(frozen=True)
class Tiling:
    """Spatial tiles for encode/decode on low-memory GPUs, in pixels (rounded down to multiples of 8).

    Tiles overlap by `overlap` pixels and are cross-faded with linear ramps there.
    Each tile runs over the full length of the video (its own causal cache), so
    only the spatial size of the activations shrinks. The mid-block attention only
    sees its own tile, and the convolutions see zero padding at tile edges, so a
    tiled result differs slightly from the untiled one; a wider overlap hides more.
    """

    tile_h: int = 256
    tile_w: int = 256
    overlap: int = 64

    def latent_grid(self, stride: int = 8) -> tuple[int, int, int]:
        """(tile_h, tile_w, overlap) in latent cells, made consistent."""
        th, tw = max(self.tile_h // stride, 2), max(self.tile_w // stride, 2)
        ov = max(self.overlap // stride, 0)
        ov = min(ov, (min(th, tw) - 1) // 2)  # tiles must be more than twice the overlap
        return th, tw, ov


# Peak GPU memory above the 0.25 GiB of bf16 weights, 81 frames, measured on an H100
# (output video included):
#   720p decode: 10.5 GiB untiled, 4.7 GiB with 512 px tiles, 2.5 GiB with 256 px tiles;
#   720p encode:  9.3 GiB untiled, 1.5 GiB with 256 px tiles; 480p decode: 4.6 / 3.5 / 1.5 GiB.
# Tiling costs time: 720p decode took 4.1 s untiled, 7.1 s (512) and 9.5 s (256).
TILING_24GB = Tiling(512, 512, 64)  # leaves room for a resident 14B int8 DiT on a 24 GB card
TILING_12GB = Tiling(256, 256, 64)  # 12 GB cards, and 480p on 8 GB cards
DEFAULT_TILING = TILING_12GB


def _as_tiling(tile) -> Tiling | None:
    """None/False: no tiling. True: DEFAULT_TILING. int: square tiles. (h, w, overlap) or Tiling."""
    if tile is None or tile is False:
        return None
    if tile is True:
        return DEFAULT_TILING
    if isinstance(tile, Tiling):
        return tile
    if isinstance(tile, int):
        return Tiling(tile, tile, DEFAULT_TILING.overlap)
    if isinstance(tile, (tuple, list)) and len(tile) == 3:
        return Tiling(*(int(v) for v in tile))
    raise TypeError(f"tile must be None, True, an int, (tile_h, tile_w, overlap) or a Tiling; got {tile!r}")


def _spans(total: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tiles of size `tile` covering [0, total), overlapping by at least `overlap`, evenly spread."""
    if tile >= total:
        return [(0, total)]
    n = math.ceil((total - overlap) / (tile - overlap))
    step = (total - tile) / (n - 1)
    return [(round(i * step), round(i * step) + tile) for i in range(n)]


def _ramp(start: int, end: int, total: int, width: int, device) -> torch.Tensor:
    """1-D blend weight of one tile: rises over `width` cells from an inner edge, flat elsewhere."""
    pos = torch.arange(end - start, device=device, dtype=torch.float32) + 0.5
    w = torch.ones_like(pos)
    if width > 0 and start > 0:
        w = torch.minimum(w, pos / width)
    if width > 0 and end < total:
        w = torch.minimum(w, pos.flip(0) / width)
    return w


def _tile_count(grid_hw, tiling: Tiling | None, stride: int) -> int:
    if tiling is None:
        return 1
    th, tw, ov = tiling.latent_grid(stride)
    return len(_spans(grid_hw[0], th, ov)) * len(_spans(grid_hw[1], tw, ov))


def _ticker(progress, total: int):
    """A no-argument callable that reports (done, total) to `progress` on each call."""
    if progress is None:
        return None
    done = [0]

    def tick():
        done[0] += 1
        progress(done[0], total)

    return tick


def _run_tiled(fn, x: torch.Tensor, grid_hw, tiling: Tiling, s_in: int, s_out: int) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of `x` and cross-fade the results.

    Tiles are laid out on the latent grid `grid_hw` so they stay aligned with the
    8x compression; `s_in` / `s_out` are how many input / output cells one latent
    cell is (decode: 1 -> 8, encode: 8 -> 1).
    """
    th, tw, ov = tiling.latent_grid(max(s_in, s_out))
    gh, gw = grid_hw
    out = wsum = None
    for h0, h1 in _spans(gh, th, ov):
        for w0, w1 in _spans(gw, tw, ov):
            piece = fn(x[..., h0 * s_in:h1 * s_in, w0 * s_in:w1 * s_in])
            if out is None:
                out = piece.new_zeros(*piece.shape[:3], gh * s_out, gw * s_out)
                wsum = piece.new_zeros(gh * s_out, gw * s_out)
            wh = _ramp(h0 * s_out, h1 * s_out, gh * s_out, ov * s_out, piece.device)
            ww = _ramp(w0 * s_out, w1 * s_out, gw * s_out, ov * s_out, piece.device)
            weight = wh[:, None] * ww[None, :]
            out[..., h0 * s_out:h1 * s_out, w0 * s_out:w1 * s_out].addcmul_(piece, weight)
            wsum[h0 * s_out:h1 * s_out, w0 * s_out:w1 * s_out] += weight
            del piece
    return out.div_(wsum)


# ---------------------------------------------------------------------------
# The VAE

def _nearest_valid_frames(n: int, step: int) -> str:
    below = max(1, 1 + (n - 1) // step * step)
    above = below + step
    return f"{below} or {above}" if below != n else str(n)


class WanVAE(nn.Module):
    """Wan2.1 causal video VAE. Children (`encoder`, `conv1`, `conv2`, `decoder`) match the checkpoint keys.

    `mean` and `std` are the latent statistics; they live in the VAE's dtype, so in
    bf16 mode the normalisation runs in bf16 like the reference.
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.temporal_compression = 2 ** sum(bool(t) for t in cfg.temporal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1)
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        # Not part of the checkpoint.
        self.register_buffer("mean", torch.tensor(LATENT_MEAN[:cfg.z_dim]), persistent=False)
        self.register_buffer("std", torch.tensor(LATENT_STD[:cfg.z_dim]), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self):
        """(mean, 1/std) shaped for broadcasting over [B, C, T, H, W], in the VAE's dtype."""
        mean = self.mean.to(self.dtype).view(1, -1, 1, 1, 1)
        inv_std = (1.0 / self.std.to(self.dtype)).view(1, -1, 1, 1, 1)
        return mean, inv_std

    # -- encode --------------------------------------------------------------

    def _encode_full(self, video: torch.Tensor, tick=None) -> torch.Tensor:
        """[B, 3, F, H, W] -> float32 normalised latent [B, z, T, H/8, W/8]; whole clip, chunked in time."""
        x = video.to(self.device, self.dtype)
        step = self.temporal_compression
        n_lat = 1 + (x.shape[2] - 1) // step
        mean, inv_std = self._stats()
        out = None
        cache: Cache = {}
        try:
            for i in range(n_lat):
                # Chunks of 1, step, step, ... frames; each gives one latent frame.
                chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + step * (i - 1):1 + step * i]
                mu = self.conv1(self.encoder(chunk, cache))[:, :self.z_dim]  # [B, z, 1, h, w]
                mu = (mu - mean) * inv_std
                if out is None:
                    out = torch.empty(mu.shape[0], self.z_dim, n_lat, *mu.shape[3:],
                                      device=mu.device, dtype=torch.float32)
                out[:, :, i:i + 1] = mu
                if tick:
                    tick()
        finally:
            cache.clear()
        return out

    @torch.inference_mode()
    def encode(self, video: torch.Tensor, tile=None, progress=None) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latent [B, 16, 1 + (F-1)/4, H/8, W/8], float32.

        F must be 4k+1 and H, W multiples of 8. `tile`: see `Tiling` (None = one piece).
        Any float dtype and device; the result is on the VAE's device.
        progress(done, total): called after each latent frame of each tile.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video [B, 3, F, H, W]; got shape {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        step, s = self.temporal_compression, self.spatial_compression
        if f < 1 or (f - 1) % step:
            raise ValueError(
                f"the Wan VAE encodes 4k+1 frames (1, 5, 9, ..., 81); got {f}: "
                f"use {_nearest_valid_frames(f, step)} frames"
            )
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}; got {h}x{w}")
        tiling = _as_tiling(tile)
        n_lat = 1 + (f - 1) // step
        tick = _ticker(progress, n_lat * _tile_count((h // s, w // s), tiling, s))
        if tiling is None:
            return self._encode_full(video, tick)
        return _run_tiled(partial(self._encode_full, tick=tick), video, (h // s, w // s), tiling, s_in=s, s_out=1)

    # -- decode --------------------------------------------------------------

    def _decode_full(self, latent: torch.Tensor, tick=None) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> float32 video [B, 3, 4(T-1)+1, 8h, 8w]; one latent frame at a time."""
        mean, inv_std = self._stats()
        z = latent.to(self.device, self.dtype)
        x = self.conv2(z / inv_std + mean)
        step = self.temporal_compression
        out = None
        cache: Cache = {}
        try:
            for i in range(x.shape[2]):
                frames = self.decoder(x[:, :, i:i + 1], cache)  # 1 frame for i = 0, then `step`
                if out is None:
                    out = torch.empty(frames.shape[0], 3, 1 + step * (x.shape[2] - 1), *frames.shape[3:],
                                      device=frames.device, dtype=torch.float32)
                start = 0 if i == 0 else 1 + step * (i - 1)
                out[:, :, start:start + frames.shape[2]] = frames
                del frames
                if tick:
                    tick()
        finally:
            cache.clear()
        return out

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor, tile=None, progress=None) -> torch.Tensor:
        """Normalised latent [B, 16, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w], float32, not clamped.

        `tile`: see `Tiling` (None = one piece). The result is on the VAE's device.
        progress(done, total): called after each latent frame of each tile.
        """
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"decode expects a latent [B, {self.z_dim}, T, h, w]; got shape {tuple(latent.shape)}")
        tiling = _as_tiling(tile)
        s = self.spatial_compression
        tick = _ticker(progress, latent.shape[2] * _tile_count(latent.shape[3:], tiling, s))
        if tiling is None:
            return self._decode_full(latent, tick)
        return _run_tiled(partial(self._decode_full, tick=tick), latent, latent.shape[3:], tiling, s_in=1, s_out=s)


# ---------------------------------------------------------------------------
# Loading

_PREFIXES = ("first_stage_model.", "vae.", "model.")


def _strip_prefix(sd: dict) -> dict:
    """Keep only the VAE part of a wrapped checkpoint, without its prefix."""
    if "encoder.conv1.weight" in sd:
        return sd
    for prefix in _PREFIXES:
        if prefix + "encoder.conv1.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _use_instead(kind: str) -> str:
    if "diffusion model (DiT)" in kind:
        return "load it with the TurboWan diffusion model loader, and pick the Wan2.1 VAE file here"
    if "text encoder" in kind:
        return "load it with the umT5 text encoder loader"
    if "LoRA" in kind:
        return "load it with a LoRA loader"
    return "pick the Wan2.1 VAE (Wan2.1_VAE.pth / wan_2.1_vae.safetensors)"


def infer_config(sd: dict) -> VAEConfig:
    """Read the architecture off the tensor shapes (not the file name)."""
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    # Walk the encoder's downsample stack: residual blocks, then a resample between levels.
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    widths, blocks, temporal = [], [0], []
    for i in layers:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            width = sd[p + "residual.2.weight"].shape[0]
            if blocks[-1] and widths[-1] != width:
                raise CheckpointError(f"unexpected Wan VAE layout at {p}* (width changes inside a level)")
            if not blocks[-1]:
                widths.append(width)
            blocks[-1] += 1
        elif p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            blocks.append(0)
        else:
            raise CheckpointError(f"unexpected Wan VAE layout at {p}* (neither a residual block nor a resample)")
    if len(set(blocks)) != 1 or len(widths) != len(blocks) or any(w % dim for w in widths):
        raise CheckpointError(f"unexpected Wan VAE layout in encoder.downsamples (residual blocks per level: {blocks})")
    return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(w // dim for w in widths),
                     num_res_blocks=blocks[0], temporal_downsample=tuple(temporal))


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be 'bf16', 'fp16', 'fp32' or a torch.dtype; got {dtype!r}") from None


def load_vae(path: str | os.PathLike, *, device=None, dtype=None) -> WanVAE:
    """Load the Wan2.1 VAE from a .safetensors or .pth file.

    device: default cuda if available, else cpu. dtype: default bf16 on cuda, float32 on cpu;
    "bf16" / "fp16" / "fp32" or a torch.dtype. Raises CheckpointError for any other model file.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = _resolve_dtype(dtype, device)
    name = os.path.basename(os.fspath(path))
    sd = _strip_prefix(read_state_dict(path))

    if not all(k in sd for k in ("encoder.conv1.weight", "conv2.weight", "decoder.conv1.weight")):
        kind = guess_kind(sd)
        raise CheckpointError(f"{name} is not a Wan video VAE: it looks like a {kind}; {_use_instead(kind)}")
    z_dim = sd["conv2.weight"].shape[0]
    if z_dim == 48 or sd["encoder.conv1.weight"].shape[1] != 3 or any(
            k.startswith("encoder.downsamples.0.downsamples.") for k in sd):
        raise CheckpointError(f"{name}: {WAN22_VAE_MESSAGE}")
    if z_dim != len(LATENT_MEAN):
        raise CheckpointError(f"{name}: a Wan-style VAE with {z_dim} latent channels is not supported; "
                              f"TurboWan models use the 16-channel Wan2.1 VAE")

    cfg = infer_config(sd)
    with torch.device("meta"):
        model = WanVAE(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not match the Wan2.1 VAE layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    del sd
    # The statistics buffers were created on meta; make them real, then move everything.
    model.mean = torch.tensor(LATENT_MEAN, dtype=dtype)
    model.std = torch.tensor(LATENT_STD, dtype=dtype)
    return model.to(device=device).eval().requires_grad_(False)
