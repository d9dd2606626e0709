"""The TurboWan diffusion transformer (Wan2.1 T2V 1.3B/14B, Wan2.2 I2V A14B).

Module names equal the checkpoint keys of the TurboWan files, so a normalised
state dict loads 1:1 (see dit_loader.py for the layouts and the load report).

Precision follows the official inference path: the residual stream and the
linears run in the compute dtype (bf16), while the time embedding, modulation,
norm statistics, RoPE and the head run in fp32. With dtype=float32 every step
is fp32 (the exact-check mode).
"""
from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import dense_attention, ensure_kernels, self_attention
from ..quant.int8 import (Int8Linear, QuantizedInput, choose_mode, compiling, linear_residual, run_eager,
                          shared_input, token_rows, w8a8_kernel_for)

log = logging.getLogger("turbo_core")

HEAD_DIM = 128
PATCH = (1, 2, 2)


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    num_layers: int
    ffn_dim: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def is_i2v(self) -> bool:
        return self.in_dim > self.out_dim

    @property
    def variant(self) -> str:
        for name, cfg in KNOWN_VARIANTS.items():
            if (cfg.dim, cfg.num_layers, cfg.ffn_dim, cfg.in_dim) == (self.dim, self.num_layers, self.ffn_dim,
                                                                      self.in_dim):
                return name
        kind = "I2V" if self.is_i2v else "T2V"
        return f"custom Wan {kind} (dim {self.dim}, {self.num_layers} layers)"


KNOWN_VARIANTS = {
    "Wan2.1-T2V-1.3B": DiTConfig(dim=1536, num_layers=30, ffn_dim=8960),
    "Wan2.1-T2V-14B": DiTConfig(dim=5120, num_layers=40, ffn_dim=13824),
    "Wan2.2-I2V-A14B": DiTConfig(dim=5120, num_layers=40, ffn_dim=13824, in_dim=36),
}


# ---------------------------------------------------------------------------
# small pieces

def sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, dim]: [cos, sin] of t * 10000^(-k/half), in float64 like the original."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """Per-token RoPE angles [t*h*w, 64] = [t.w_t (22) | h.w_h (21) | w.w_w (21)].

    Computed in fp32 the way the reference builds its tables (theta 10000,
    head dim split 44/42/42, integer positions from 0).
    """
    dim_hw = HEAD_DIM // 6 * 2  # 42
    dim_t = HEAD_DIM - 2 * dim_hw  # 44

    def table(n, d):
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
        return torch.outer(torch.arange(n, device=device).float(), inv)

    ft, fh, fw = table(t, dim_t), table(h, dim_hw), table(w, dim_hw)
    return torch.cat([
        ft[:, None, None, :].expand(t, h, w, -1),
        fh[None, :, None, :].expand(t, h, w, -1),
        fw[None, None, :, :].expand(t, h, w, -1),
    ], dim=-1).reshape(t * h * w, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) rotation of adjacent channel pairs, in fp32.

    x [B,L,H,D]; freqs [L,D/2] complex (cos + i sin). Pairs (2i, 2i+1) are the
    complex numbers x[2i] + i x[2i+1], so the rotation is one complex product.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full hidden dim; fp32 statistics and fp32 weight (FastRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32, result in the input dtype; affine weights kept fp32."""

    def __init__(self, dim: int, eps: float, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if affine else None

    def forward(self, x):
        if self.weight is None:  # statistics are fp32 inside layer_norm whatever x's dtype
            return F.layer_norm(x, (self.dim,), eps=self.eps)
        return F.layer_norm(x.float(), (self.dim,), self.weight, self.bias, self.eps).to(x.dtype)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 (the reference runs these under fp32 autocast)."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


def make_linear(d_in: int, d_out: int, int8: bool, dtype) -> nn.Module:
    if int8:
        return Int8Linear(d_in, d_out, device="meta", dtype=dtype)
    return nn.Linear(d_in, d_out, device="meta", dtype=dtype)


class _Namespace(nn.Module):
    """An empty module that only carries a name in the state-dict path."""


# ---------------------------------------------------------------------------
# attention and blocks

class SelfAttention(nn.Module):
    # norm_rope(y, weight, freqs, eps, heads) with supports(y, heads): the fused Triton
    # RMSNorm + RoPE, set by turbo_core.kernels.install(); None = the PyTorch ops.
    fused_norm_rope = None

    def __init__(self, cfg: DiTConfig, int8: set[str], sla_proj: bool, dtype):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (make_linear(d, d, n in int8, dtype) for n in "qkvo")
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)
        if sla_proj:  # key path: self_attn.attn_op.local_attn.proj_l, as in TurboWan files
            self.attn_op = _Namespace()
            self.attn_op.local_attn = _Namespace()
            self.attn_op.local_attn.proj_l = nn.Linear(HEAD_DIM, HEAD_DIM, device="meta", dtype=torch.float32)

    @property
    def proj_l(self):
        if not hasattr(self, "attn_op"):
            return None
        p = self.attn_op.local_attn.proj_l
        return p.weight, p.bias

    def _norm_rope(self, y, norm: RMSNorm, freqs):
        fused = type(self).fused_norm_rope
        if fused is not None and fused.supports(y, self.heads):
            return run_eager(fused.norm_rope, y, norm.weight, freqs, norm.eps, self.heads)
        b, n, _ = y.shape
        return apply_rope(norm(y).view(b, n, self.heads, HEAD_DIM), freqs)

    def qkv(self, x, freqs) -> list:
        """[q, k, v] as [B,L,H,128] (q, k normed and rotated). Called as a plain method with a
        temporary x, so x is freed here once v is made (an nn.Module call would hold it)."""
        b, n, _ = x.shape
        x = shared_input(x, (self.q, self.k, self.v))  # int8 W8A8: one activation quantisation
        q = self._norm_rope(self.q(x), self.norm_q, freqs)
        k = self._norm_rope(self.k(x), self.norm_k, freqs)
        v = self.v(x).view(b, n, self.heads, HEAD_DIM)
        del x
        return [q, k, v]

    def attend(self, qkv: list, attention: str, sla_topk: float, shard=None):
        """Attention over `qkv` (emptied here, so q/k/v are freed before the output projection), as
        [B, L, D]: the input of `self.o` (which the block may run with its residual add fused)."""
        q, k, v = qkv
        qkv.clear()
        if shard is None:
            out = self_attention(q, k, v, attention, proj_l=self.proj_l, topk=sla_topk)  # [B,L,H,128]
        else:  # sequence parallel: all-to-all, full sequence for H/N heads, all-to-all back
            out = shard.attention(self_attention, q, k, v, attention, proj_l=self.proj_l, topk=sla_topk)
        del q, k, v
        return out.flatten(2)

    def forward(self, x, freqs, attention: str, sla_topk: float, shard=None):
        return self.o(self.attend(self.qkv(x, freqs), attention, sla_topk, shard))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from all context rows; no mask, no RoPE."""

    def __init__(self, cfg: DiTConfig, int8: set[str], dtype):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (make_linear(d, d, n in int8, dtype) for n in "qkvo")
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)

    def forward(self, x, ctx):
        return self.o(self.attend(x, ctx))

    def attend(self, x, ctx):
        """The attention before the output projection, [B, L, D]."""
        b = x.shape[0]
        q = self.q(x)
        fused = SelfAttention.fused_norm_rope  # its kernel also does the plain RMSNorm, in one pass
        if fused is not None and fused.supports(q) and not compiling():  # compiled: inductor fuses it
            q = fused.rms_norm(q, self.norm_q.weight, self.norm_q.eps)
        else:
            q = self.norm_q(q)
        q = q.view(b, -1, self.heads, HEAD_DIM)
        ctx = shared_input(ctx, (self.k, self.v))
        k = self.norm_k(self.k(ctx)).view(b, -1, self.heads, HEAD_DIM)
        v = self.v(ctx).view(b, -1, self.heads, HEAD_DIM)
        return dense_attention(q, k, v).flatten(2)


# Tokens per FFN pass: passes bound the [L, ffn_dim] hidden state (bf16 out, GELU,
# int8 codes). At 40960 a 1.3B-480p video (32760 tokens) takes one pass and a
# 14B-720p one (75600) two of 37888. H100, against passes of 16384 (RESULTS.md
# session 19): steps 0.6-1.1% faster (fewer launches and GEMM waves, we think),
# the 14B int8 peak unchanged at 18.4 GiB (attention's is as high), bf16 31.6 GiB
# instead of 31.4 (one pass: 32.8). A multiple of 128, so W8A8 activation tiles
# (128 rows) are unchanged by the split. 0 = one pass.
FFN_CHUNK = 40960


class Block(nn.Module):
    # The fused gated-residual / LayerNorm / AdaLN Triton kernels (kernels.residual_norm_triton),
    # set by turbo_core.kernels.install(); None = the PyTorch ops. Compiled blocks keep the
    # PyTorch ops, which inductor fuses itself (no graph breaks).
    fused_ops = None

    def __init__(self, cfg: DiTConfig, int8: set[str], sla_proj: bool, dtype):
        super().__init__()
        d = cfg.dim
        self.ffn_chunk = FFN_CHUNK
        self.modulation = nn.Parameter(torch.empty(1, 6, d, device="meta"), requires_grad=False)
        self.norm1 = LayerNorm(d, cfg.eps)
        self.self_attn = SelfAttention(cfg, {n[len("self_attn."):] for n in int8 if n.startswith("self_attn.")},
                                       sla_proj, dtype)
        self.norm3 = LayerNorm(d, cfg.eps, affine=True)
        self.cross_attn = CrossAttention(cfg, {n[len("cross_attn."):] for n in int8 if n.startswith("cross_attn.")},
                                         dtype)
        self.norm2 = LayerNorm(d, cfg.eps)
        self.ffn = nn.Sequential(make_linear(d, cfg.ffn_dim, "ffn.0" in int8, dtype), nn.GELU(approximate="tanh"),
                                 make_linear(cfg.ffn_dim, d, "ffn.2" in int8, dtype))

    def forward(self, x, e0, freqs, ctx, attention, sla_topk, shard=None):
        # e0 [B,6,D] fp32 -> shift/scale/gate for self-attention, then for the FFN
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        fused = self._fused(x)
        # plain method calls with temporaries: the modulated input and q/k/v are freed as soon
        # as they are used (14B-720p: 0.7 GiB each), not held until the attention returns
        sa = self.self_attn
        if fused is None:
            qkv = sa.qkv(self._modulate(self.norm1, x, shift_sa, scale_sa), freqs)
        else:
            qkv = sa.qkv(self._norm(fused, (sa.q, sa.k, sa.v), x, self.norm1.eps, shift=shift_sa, scale=scale_sa),
                         freqs)
        attn = sa.attend(qkv, attention, sla_topk, shard)
        if fused is None:
            x = x + sa.o(attn) * gate_sa.to(x.dtype)  # bf16, as upstream
            del attn
            x = x + self.cross_attn(self.norm3(x), ctx)
            h = self._modulate(self.norm2, x, shift_ff, scale_ff)
        else:  # the same math, each residual add fused with the norm that follows it
            x, n = self._add_norm(fused, sa.o, attn, x, gate_sa, (self.cross_attn.q,), self.norm3.eps,
                                  weight=self.norm3.weight, bias=self.norm3.bias)
            del attn
            c = self.cross_attn.attend(n, ctx)
            del n
            # FFN passes over token ranges take int8 rows only of a single video (token_rows)
            ffn_in = (self.ffn[0],) if x.shape[0] == 1 or self._ffn_passes(x.shape[1]) == 1 else ()
            x, h = self._add_norm(fused, self.cross_attn.o, c, x, None, ffn_in, self.norm2.eps,
                                  shift=shift_ff, scale=scale_ff)
            del c
        return self._ffn_residual(x, h, gate_ff, fused)

    @staticmethod
    def _add_norm(fused, layer, inp, x, gate, readers, eps, **norm):
        """(x + layer(inp) * gate, its norm as `readers` take it): the add in the W8A8 GEMM's
        epilogue where it can be (then `_norm`: the layer's output is never written), else one add
        + norm pass."""
        s = linear_residual(layer, inp, x, gate)
        if s is None:
            return fused.add_norm(x, layer(inp), gate, eps, **norm)
        return s, Block._norm(fused, readers, s, eps, **norm)

    @staticmethod
    def _norm(fused, readers, x, eps, **norm):
        """x's LayerNorm (affine: weight / bias; AdaLN: shift / scale) as `readers` take it: when the
        W8A8 kernel runs them all, straight to int8 -- a QuantizedInput made from x and the norm's
        row stats, so the normed tensor is never written and read back -- else the normed tensor."""
        kernel = w8a8_kernel_for(x, readers)
        if kernel is None:
            return fused.norm(x, eps, **norm)
        codes, scales = run_eager(kernel.quantize_norm, x, fused.norm_stats(x, eps), norm)
        return QuantizedInput(codes, scales, x.shape, x.dtype)

    def _fused(self, x):
        """The fused row kernels when they apply to x (eager CUDA blocks), else None."""
        fused = type(self).fused_ops
        if fused is None or not fused.supports(x) or compiling():
            return None
        return fused

    @staticmethod
    def _modulate(norm, x, shift, scale):
        """AdaLN: shift + norm(x) * (1 + scale), fp32 math, in x's dtype (the torch ops)."""
        return torch.addcmul(shift, norm(x).float(), 1 + scale).to(x.dtype)

    def _ffn_passes(self, n: int) -> int:
        """Passes the FFN makes over n tokens (1: all at once)."""
        return 1 if not self.ffn_chunk or n <= self.ffn_chunk else -(-n // self.ffn_chunk)

    def _ffn_residual(self, x, h, gate, fused=None):
        """x + ffn(h) * gate.to(x.dtype), in passes of at most `ffn_chunk` tokens (equal sizes, 128-aligned);
        h: the normed tensor, or (fused kernels) its int8 codes."""
        n = x.shape[1]
        passes = self._ffn_passes(n)
        if passes == 1:
            if fused is not None:
                return self._ffn_add(fused, x, h, gate)
            return x + self._ffn(h) * gate.to(x.dtype)
        step = -(-n // (passes * 128)) * 128
        out = torch.empty_like(x)
        for s in range(0, n, step):
            e = min(s + step, n)
            if fused is not None:
                self._ffn_add(fused, x[:, s:e], token_rows(h, s, e), gate, out=out[:, s:e])
            else:
                out[:, s:e] = x[:, s:e] + self._ffn(h[:, s:e]) * gate.to(x.dtype)
        return out

    def _ffn(self, h):
        """ffn(h), the W8A8 kernel (when it runs ffn.2) taking the GELU into its quantisation pass."""
        up, _, down = self.ffn
        return down(shared_input(up(h), (down,), gelu=True))

    def _ffn_add(self, fused, x, h, gate, out=None):
        """x + ffn(h) * gate (into `out` if given): the add in ffn.2's W8A8 epilogue where it can
        be, else the fused row kernel's gated add."""
        up, _, down = self.ffn
        hidden = shared_input(up(h), (down,), gelu=True)
        y = linear_residual(down, hidden, x, gate, out)
        return fused.gated_add(x, down(hidden), gate, out=out) if y is None else y


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig, dtype):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim, device="meta"), requires_grad=False)
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(PATCH) * cfg.out_dim, device="meta", dtype=dtype)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return linear_fp32(self.head, self.norm(x).float() * (1 + scale) + shift)  # [B,L,64] fp32


# ---------------------------------------------------------------------------
# the model

class WanDiT(nn.Module):
    """`model(x, timestep, context, y=None, *, attention="original", sla_topk=0.1) -> velocity`.

    x [B,16,T,H,W]; timestep [B] network time (RF t x 1000); context [B,L,text_dim]
    used as given (the text encoder supplies the 512 zero-padded rows);
    y [B,20,T,H,W] I2V condition. Returns fp32 velocity [B,16,T,H,W].
    """

    def __init__(self, cfg: DiTConfig, *, dtype=torch.bfloat16, int8: set[str] = frozenset(),
                 sla_blocks: set[int] = frozenset()):
        super().__init__()
        self.config = cfg
        self.compute_dtype = dtype
        d = cfg.dim
        self.patch_embedding = nn.Linear(cfg.in_dim * math.prod(PATCH), d, device="meta", dtype=dtype)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d, device="meta", dtype=dtype),
                                            nn.GELU(approximate="tanh"), nn.Linear(d, d, device="meta", dtype=dtype))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d, device="meta", dtype=dtype), nn.SiLU(),
                                            nn.Linear(d, d, device="meta", dtype=dtype))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, device="meta", dtype=dtype))
        self.blocks = nn.ModuleList(
            Block(cfg, {n[len(f"blocks.{i}."):] for n in int8 if n.startswith(f"blocks.{i}.")}, i in sla_blocks,
                  dtype)
            for i in range(cfg.num_layers))
        self.head = Head(cfg, dtype)
        self.load_report = None  # filled by the loader
        self.between_blocks = None  # optional callable run between blocks (e.g. a host's interrupt check)
        self.parallel = None  # a turbo_core.parallel.SequenceParallel: this rank's share of the tokens
        self.int8_auto = False  # set_linear_mode("auto"): int8 layers pick W8A8 or dequant per GPU
        self._rope_cache: dict = {}
        self.cuda_graphs = False  # set_cuda_graphs(True): replay each step as one CUDA graph
        self._graph = None  # (key, graph, static inputs, static output) of the last input shapes
        self._graph_seen = None  # key of the last eager forward (the next one with it is captured)

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    # -- pieces the forward is made of (public so tests can check them one by one)

    def time_embed(self, timestep: torch.Tensor):
        """[B] -> e [B,D] and e0 [B,6,D], both fp32."""
        e = linear_fp32(self.time_embedding[2],
                        F.silu(linear_fp32(self.time_embedding[0], sinusoid(self.config.freq_dim, timestep).float())))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def rope(self, t: int, h: int, w: int):
        """(angles [L,64] fp32, cos + i sin [L,64] complex64), cached for the last size."""
        key = (t, h, w, self.device)
        if key not in self._rope_cache:
            angles = rope_angles(t, h, w, self.device)
            self._rope_cache = {key: (angles, torch.complex(torch.cos(angles), torch.sin(angles)))}
        return self._rope_cache[key]

    def _check_inputs(self, x, timestep, context, y):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B,16,T,H,W], got shape {tuple(x.shape)}")
        b, c, _, h, w = x.shape
        want_y = cfg.in_dim - c
        if cfg.is_i2v and y is None:
            raise ValueError(f"{cfg.variant} is an image-to-video model: pass the I2V condition y [B,{want_y},T,H,W]")
        if not cfg.is_i2v and y is not None:
            raise ValueError(f"{cfg.variant} is a text-to-video model: it takes no image condition y")
        if y is not None and (y.shape[0] != b or y.shape[1] != want_y or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y must be [B,{want_y},T,H,W] matching x {tuple(x.shape)}, got {tuple(y.shape)}")
        if c + (0 if y is None else y.shape[1]) != cfg.in_dim:
            raise ValueError(f"x has {c} channels; this model takes {cfg.in_dim - (0 if y is None else y.shape[1])}")
        if h % 2 or w % 2:
            raise ValueError(f"latent height and width must be even, got {h}x{w}")
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim or context.shape[0] not in (1, b):
            raise ValueError(f"context must be [B,L,{cfg.text_dim}] with B={b}, got {tuple(context.shape)}")
        if timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep must have {b} entries, got {tuple(timestep.shape)}")

    @torch.no_grad()
    def forward(self, x, timestep, context, y=None, *, attention: str = "original", sla_topk: float = 0.1):
        timestep = torch.as_tensor(timestep, device=self.device).reshape(-1)
        self._check_inputs(x, timestep, context, y)
        if self.cuda_graphs and self.device.type == "cuda" and self.parallel is None:
            return self._graphed(x, timestep, context, y, attention, sla_topk)
        return self._forward(x, timestep, context, y, attention, sla_topk)

    # -- CUDA graphs: a 1.3B-480p step launches ~1000 kernels from Python, ~4 ms of CPU per block
    # against ~6 ms of GPU work (H100): the launches are what a replay saves.

    def set_cuda_graphs(self, on: bool) -> None:
        """Replay each step as one CUDA graph (CUDA only; not with sequence parallel): the first
        call with new input shapes runs eagerly (compiles, autotunes, the int8 choice), the second
        captures, later ones copy their inputs in and replay. Costs the step's activation memory,
        held until the shapes change, the weights move or this is switched off. H100: 1.3B-480p
        int8 0.181 s vs 0.187 s eager (bf16, GPU-bound: no gain); 14B-720p int8 3.55 s and 33 GiB
        reserved vs 3.09 s and 18.4 GiB eager, so it is off by default (bench/RESULTS.md)."""
        self.cuda_graphs = bool(on)
        if not on:
            self.release_graphs()

    def release_graphs(self) -> None:
        """Drop the captured graph and its memory (e.g. before decoding the video)."""
        self._graph = self._graph_seen = None

    def _graph_key(self, inputs, attention, sla_topk):
        return (tuple(None if t is None else (t.shape, t.dtype, t.device) for t in inputs), attention, sla_topk,
                # where the weights are (a host that offloads them between steps moves them)
                self.patch_embedding.weight.data_ptr(), self.blocks[-1].modulation.data_ptr(),
                tuple(m.mode for m in self.blocks[0].modules() if isinstance(m, Int8Linear)),
                self.blocks[0].ffn_chunk)

    def _graphed(self, x, timestep, context, y, attention, sla_topk):
        inputs = (x, timestep, context, y)
        key = self._graph_key(inputs, attention, sla_topk)
        if self._graph is None or self._graph[0] != key:
            self._graph = None
            if self._graph_seen != key:  # first call with these shapes: eager, and it warms everything up
                self._graph_seen = key
                return self._forward(x, timestep, context, y, attention, sla_topk)
            static = tuple(None if t is None else t.to(self.device, copy=True) for t in inputs)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the eager step's cached blocks: the graph has its own pool
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self._forward(*static, attention, sla_topk)
            except Exception as exc:  # something here cannot be captured: keep generating, eagerly
                log.warning("CUDA graphs off for this model: the step could not be captured (%s: %s)",
                            type(exc).__name__, exc)
                self.set_cuda_graphs(False)
                torch.cuda.synchronize()
                # a failed capture leaves torch's CUDA RNG in capture mode (later randn raise);
                # an empty capture takes it out again
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "The CUDA Graph is empty": it is meant to be
                    with torch.cuda.graph(torch.cuda.CUDAGraph()):
                        pass
                return self._forward(x, timestep, context, y, attention, sla_topk)
            self._graph = (key, graph, static, out)
        _, graph, static, out = self._graph
        for dst, src in zip(static, inputs):
            if dst is not None:
                dst.copy_(src)
        if self.between_blocks is not None:  # the host's interrupt check: once per step here
            self.between_blocks()
        graph.replay()
        return out.clone()

    def _forward(self, x, timestep, context, y, attention, sla_topk):
        dt = self.compute_dtype
        b = x.shape[0]
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # I2V: [noisy 16 | mask 4 | image latent 16]
        x = x.to(self.device, dt)
        _, c, t, h, w = x.shape
        t, h, w = t // PATCH[0], h // PATCH[1], w // PATCH[2]
        # patchify: token order (t h w), each patch flattened (c, kt, kh, kw), c slowest
        tokens = x.view(b, c, t, PATCH[0], h, PATCH[1], w, PATCH[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tokens = tokens.reshape(b, t * h * w, -1)
        _, freqs = self.rope(t, h, w)
        shard = None if self.parallel is None else self.parallel.shard(t * h * w)
        if shard is not None:  # sequence parallel: this rank's L/N tokens and their RoPE angles
            tokens, freqs = shard.local(tokens, 1), shard.local(freqs, 0)
        x = self.patch_embedding(tokens)  # [B,L,D]

        e, e0 = self.time_embed(timestep.expand(b))
        ctx = self.text_embedding(context.to(self.device, dt).expand(b, -1, -1))  # [B,L_ctx,D]
        if self.int8_auto:  # timed on the blocks in turn, on the real inputs (outputs dropped); without
            # the shard, so no rank waits in a collective for one whose timing failed: its linears
            # see this rank's tokens either way, and the attention is the same in both modes
            turn = itertools.cycle(self.blocks)
            self._choose_int8_mode(x.shape[0] * x.shape[1],
                                   lambda: next(turn)(x, e0, freqs, ctx, attention, sla_topk, None))
        for block in self.blocks:
            if self.between_blocks is not None:
                self.between_blocks()
            x = block(x, e0, freqs, ctx, attention, sla_topk, shard)
        out = self.head(x, e)  # [B,L,(kt kh kw c)] fp32, c fastest
        if shard is not None:
            out = shard.gather(out, 1)  # every rank: all L tokens
        out = out.view(b, t, h, w, *PATCH, self.config.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, self.config.out_dim, t * PATCH[0], h * PATCH[1], w * PATCH[2])

    def compile_blocks(self, **options) -> None:
        """Run each block under torch.compile, which fuses the norm, modulation, RoPE and
        residual arithmetic between the matmuls. Attention and int8 kernels stay eager."""
        for block in self.blocks:
            block.compile(dynamic=False, **options)

    def uncompile_blocks(self) -> None:
        """Back to eager blocks (undoes `compile_blocks`)."""
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile sets

    @property
    def blocks_compiled(self) -> bool:
        return getattr(self.blocks[0], "_compiled_call_impl", None) is not None

    def set_ffn_chunk(self, tokens: int) -> None:
        """Tokens per FFN pass (0: all at once); bounds the FFN's hidden-state memory."""
        if tokens < 0 or tokens % 128:
            raise ValueError(f"ffn chunk must be 0 or a positive multiple of 128, got {tokens}")
        for block in self.blocks:
            block.ffn_chunk = tokens

    def set_linear_mode(self, mode: str) -> None:
        """int8 layers: "w8a8" (exact official arithmetic / Triton GEMM), "dequant", or "auto"
        (the faster of the two on this GPU, timed at the first forward of each size)."""
        if mode not in ("auto", "w8a8", "dequant"):
            raise ValueError(f"linear must be auto, w8a8 or dequant, not {mode!r}")
        self.int8_auto = mode == "auto" and any(isinstance(m, Int8Linear) for m in self.modules())
        self._set_int8_mode("dequant" if mode == "auto" else mode)

    def _set_int8_mode(self, mode: str) -> None:
        for m in self.modules():
            if isinstance(m, Int8Linear) and m.mode != mode:
                m.mode = mode

    def _choose_int8_mode(self, tokens: int, run_block) -> None:
        """linear="auto": both int8 ways timed on block forwards, once per GPU and size
        (quant.int8.choose_mode). `run_block` runs the next block: each call streams another
        block's weights from memory, as a step does (one block run again and again keeps much
        of its weights and dequantised copies in L2, which flattered dequant + cuBLAS)."""
        layers = [m for block in self.blocks for m in block.modules() if isinstance(m, Int8Linear)]
        if not layers or self.device.type != "cuda":
            return
        ensure_kernels(self.device)
        mode = choose_mode(layers, run_block, tokens, self.compute_dtype, self.device,
                           context=(self.blocks[0].ffn_chunk,))
        if self.parallel is not None:  # one numerics on every rank: W8A8 only where all ranks chose it
            mode = "dequant" if self.parallel.agree(mode != "w8a8") else "w8a8"
        self._set_int8_mode(mode)
