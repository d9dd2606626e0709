"""umT5-XXL text encoder: prompts -> the [B, 512, 4096] context the Wan DiT reads.

    encoder = load_text_encoder("umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    context = encoder.encode(["a cat on a skateboard"])     # [1, 512, 4096], rows after </s> are 0

The network is a T5 encoder (umT5: one relative-position bias table per layer). Its size is
read from the tensor shapes, so the same code runs the real model and the tiny test fixture.
Two file layouts load:
  * Wan / TurboDiffusion: `token_embedding.weight`, `blocks.N.attn.q.weight`, ... (the module
    names used here);
  * Hugging Face T5 / ComfyUI: `shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...
    with any prefix, and ComfyUI's scaled-fp8 weights (dequantized on load).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core.io.checkpoint import CheckpointError, guess_kind, read_state_dict
from turbo_core.models.tokenizer import EMBEDDED_KEY, TEXT_LEN, UMT5Tokenizer, load_tokenizer

log = logging.getLogger("turbo_core")

__all__ = ["load_text_encoder", "TextEncoder", "UMT5Config", "UMT5Encoder", "build_encoder",
           "convert_state_dict", "infer_config"]


# ---------------------------------------------------------------------------
# Public entry point

def load_text_encoder(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | UMT5Tokenizer | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> TextEncoder:
    """Load umT5-XXL (.safetensors or .pth, either layout) and its tokenizer.

    device: default cuda if available, else cpu. dtype: default bf16 ("bf16"/"fp16"/"fp32" or a
    torch dtype). The tokenizer comes from the file's `spiece_model` tensor, else `tokenizer`,
    else a spiece.model / tokenizer.json found near the file (see turbo_core.models.tokenizer).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    sd = read_state_dict(path)
    embedded = _pop_embedded_tokenizer(sd)
    _detect_layout(sd, os.fspath(path))  # a wrong file is named before anything else
    # Before the (slow) weight conversion, so a missing tokenizer fails fast.
    tok = load_tokenizer(path, tokenizer, embedded=embedded)
    model = build_encoder(sd, device=device, dtype=dtype, name=os.fspath(path))
    del sd
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {tok.source} has {tok.vocab_size} pieces but {os.fspath(path)} embeds only "
            f"{model.config.vocab_size} tokens: it is not this model's tokenizer (umT5 needs google/umt5-xxl's)"
        )
    log.info("umT5: %s on %s/%s, %s", model.config, device, dtype, tok)
    return TextEncoder(model, tok, device=device, dtype=dtype)


class TextEncoder:
    """A loaded umT5 encoder plus tokenizer. `encode` gives what the DiT takes as context."""

    text_len = TEXT_LEN

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer, *, device, dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def config(self) -> UMT5Config:
        return self.model.config

    def to(self, device) -> TextEncoder:
        """Move the weights (e.g. back to CPU to free the GPU for the DiT)."""
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def tokenize(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: [B, 512] int64 on CPU."""
        return self.tokenizer(prompts, self.text_len)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """[B, 512, dim] in self.dtype; rows at and after each prompt's length are exactly 0."""
        ids, mask = self.tokenize(prompts)
        return self.encode_tokens(ids, mask)

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask [B, L] -> [B, L, dim]; positions >= mask.sum(1) are set to 0."""
        ids = ids.to(self.device, torch.long)
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        B, L = ids.shape
        lengths = mask.gt(0).sum(dim=1)  # [B]

        # Columns no prompt uses are masked keys for every row and zeroed on output, so running
        # only up to the last used one gives the same result far faster (prompts are ~100 of 512).
        used = mask.gt(0).any(dim=0).nonzero()
        n = int(used[-1]) + 1 if used.numel() else 1
        n = min(L, -(-n // 8) * 8)  # a multiple of 8 keeps fused attention kernels happy

        x = self.model(ids[:, :n], mask[:, :n])  # [B, n, dim]
        keep = torch.arange(n, device=self.device)[None, :] < lengths[:, None]  # [B, n]
        out = x.new_zeros(B, L, x.shape[-1])
        out[:, :n] = torch.where(keep[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return out


# ---------------------------------------------------------------------------
# The network (module names = Wan / TurboDiffusion checkpoint keys)

@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    dim: int
    dim_attn: int
    num_heads: int
    dim_ffn: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


class T5RMSNorm(nn.Module):
    """x / rms(x) * w, statistics in fp32; cast to the weight dtype before the multiply (as T5 does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class GELUTanh(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head); the `embedding` name matches the checkpoint key."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets):  # [L, L] int64 -> [1, H, L, L]
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """[L, L] bucket of (key position - query position), bidirectional T5 scheme.

    Half the buckets are for keys after the query. In each half, distances below a quarter of
    the buckets get their own bucket; longer ones share log-spaced buckets up to max_distance.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # Same float expression as T5, so bucket edges fall on the same distances.
    far = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    far = far.clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class T5Attention(nn.Module):
    """Multi-head self-attention with NO 1/sqrt(d) scale; the bias carries positions and the mask."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x, bias):  # x [B, L, C], bias [B, H, L, L] -> [B, L, C]
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))  # [B, H, L, D]
        # SDPA: softmax(q k^T * 1 + bias) v, softmax accumulated in fp32.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class T5GatedFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate.0` is the Linear, as in the checkpoint keys."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5GatedFFN(cfg)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)  # umT5: one per layer

    def forward(self, x, buckets, keep):  # x [B, L, C]; buckets [L, L]; keep [B, 1, 1, L] bool
        pos = self.pos_embedding(buckets).to(x.dtype)  # [1, H, L, L]
        # Padded keys get the dtype's minimum (not -inf), exactly like T5.
        bias = torch.where(keep, pos, torch.finfo(x.dtype).min)  # [B, H, L, L]
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _fp16_clamp(x):
    # T5 activations can exceed fp16's range; clamp instead of letting inf spread.
    if x.dtype == torch.float16:
        bound = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-bound, bound)
    return x


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids, mask=None):  # ids, mask [B, L] -> [B, L, dim]
        x = self.token_embedding(ids)
        L = ids.shape[1]
        buckets = relative_position_buckets(L, self.config.num_buckets, self.config.max_distance, ids.device)
        if mask is None:
            mask = torch.ones_like(ids)
        keep = mask.gt(0)[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x)


# ---------------------------------------------------------------------------
# Loading: any layout -> Wan names, fp8 dequantized, built on meta and assigned

def build_encoder(
    sd: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.bfloat16,
    name: str = "state dict",
) -> UMT5Encoder:
    """A ready (eval, no grad) encoder from a state dict in either layout. Consumes `sd`.

    The module is created on the meta device and the converted tensors are assigned to it,
    one at a time, so peak memory stays near one copy of the weights.
    """
    dtype = resolve_dtype(dtype)
    weights, cfg = convert_state_dict(sd, device=device, dtype=dtype, name=name)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{name} does not fit umT5 {cfg}: missing {_few(result.missing_keys)}, "
            f"unexpected {_few(result.unexpected_keys)}"
        )
    return model.eval().requires_grad_(False)


def convert_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    name: str = "state dict",
) -> tuple[dict[str, torch.Tensor], UMT5Config]:
    """Wan-named tensors in `dtype` on `device`, and the config their shapes imply. Consumes `sd`."""
    _pop_embedded_tokenizer(sd)
    sd = to_wan_names(sd, name)
    cfg = infer_config(sd, name)
    scales = {k: sd.pop(k) for k in [k for k in sd if k.endswith(_SCALE_SUFFIXES)]}
    out = {}
    for key in list(sd):
        tensor = sd.pop(key).to(device)  # pop: the source copy can be freed as we go
        scale = _scale_for(key, scales)
        if scale is not None:
            tensor = _dequantize(tensor, scale.to(device), key)
        out[key] = tensor.to(dtype)
        del tensor
    if scales:
        log.warning("umT5: %d scale tensors had no matching weight: %s", len(scales), _few(list(scales)))
    return out, cfg


def infer_config(sd: dict[str, torch.Tensor], name: str = "state dict") -> UMT5Config:
    """Sizes from the shapes of Wan-named tensors (works on meta tensors)."""
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{name}: umT5 tensor {err} is missing, so the file is incomplete") from None
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return UMT5Config(vocab_size=int(vocab), dim=int(dim), dim_attn=int(dim_attn), num_heads=int(num_heads),
                      dim_ffn=int(dim_ffn), num_layers=max(layers) + 1, num_buckets=int(num_buckets))


# Scale companions of fp8 weights: ComfyUI "scaled fp8" (`scale_weight`) and `weight_scale`.
# An fp8 weight without one is simply cast (scale 1).
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Quantization side-data that inference here does not use (input scales, format markers).
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_KEYS = ("scaled_fp8",)

# Hugging Face T5 module path (after the `encoder.` prefix) -> Wan module path.
# `shared` (the embedding, outside `encoder.`) arrives renamed to `embed_tokens`.
_HF_RULES = [
    (r"block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])", r"blocks.\1.attn.\2"),
    (r"block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias", r"blocks.\1.pos_embedding.embedding"),
    (r"block\.(\d+)\.layer\.0\.layer_norm", r"blocks.\1.norm1"),
    (r"block\.(\d+)\.layer\.1\.layer_norm", r"blocks.\1.norm2"),
    (r"block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0", r"blocks.\1.ffn.gate.0"),
    (r"block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1", r"blocks.\1.ffn.fc1"),
    (r"block\.(\d+)\.layer\.1\.DenseReluDense\.wo", r"blocks.\1.ffn.fc2"),
    (r"final_layer_norm", "norm"),
    (r"embed_tokens", "token_embedding"),
]


def to_wan_names(sd: dict[str, torch.Tensor], name: str = "state dict") -> dict[str, torch.Tensor]:
    """Strip the prefix and rename HF/ComfyUI keys to the Wan names this module uses.

    Empties `sd` as it goes, so the caller's dict holds no second reference to any tensor.
    """
    for key in [k for k in sd if k in _IGNORED_KEYS or k.endswith(_IGNORED_SUFFIXES)]:
        del sd[key]
    layout, prefix = _detect_layout(sd, name)
    # HF: `prefix` ends at `encoder.`; the embedding `shared.weight` sits one level up.
    shared = prefix[: -len("encoder.")] + "shared." if layout == "hf" else None
    out, ignored = {}, 0
    for key in list(sd):
        tensor = sd.pop(key)
        if key.startswith(prefix):
            key = key[len(prefix):]
        elif shared and key.startswith(shared):
            key = "embed_tokens." + key[len(shared):]
        else:
            ignored += 1  # e.g. a T5 decoder or another model bundled in the same file
            continue
        if layout == "hf":
            module, _, attr = key.rpartition(".")
            for pattern, repl in _HF_RULES:
                if re.fullmatch(pattern, module):
                    module = re.sub(pattern, repl, module)
                    break
            key = f"{module}.{attr}"
        out[key] = tensor
    if ignored:
        log.info("umT5: ignoring %d keys outside %r in %s", ignored, prefix, name)
    if layout == "hf":
        _refuse_shared_position_bias(out, name)
    return out


def _refuse_shared_position_bias(sd, name):
    # T5 v1.1 / Flan-T5 keep one position bias (block 0) for all layers: not umT5.
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) > 1 and "blocks.1.pos_embedding.embedding.weight" not in sd:
        raise CheckpointError(
            f"{name} is a T5 v1.1 / Flan-T5 text encoder (one shared position bias, like the t5xxl used by "
            f"Flux and SD3), not umT5-XXL. Wan needs umT5-XXL, e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors "
            f"or models_t5_umt5-xxl-enc-bf16.pth"
        )


def _detect_layout(sd, name) -> tuple[str, str]:
    """("wan" | "hf", key prefix). HF's prefix ends at `encoder.`; decoder keys fall outside it."""
    for key in sd:
        m = re.fullmatch(r"((?:.*\.)?)blocks\.0\.attn\.q\.weight", key)
        if m and m.group(1) + "blocks.0.ffn.gate.0.weight" in sd:
            return "wan", m.group(1)
        if m := re.fullmatch(r"((?:.*\.)?encoder\.)block\.0\.layer\.0\.SelfAttention\.q\.weight", key):
            return "hf", m.group(1)
    raise _wrong_file(sd, name)


def _wrong_file(sd, name) -> CheckpointError:
    kind = guess_kind(sd)
    if kind.startswith("T5"):
        return CheckpointError(
            f"{name} looks like a T5 text encoder, but not in a layout this loader knows "
            f"(first keys: {_few(list(sd))}). Use umT5-XXL as umt5_xxl_*.safetensors (ComfyUI) or "
            f"models_t5_umt5-xxl-enc-bf16.pth (Wan / TurboDiffusion)"
        )
    fits = {
        "Wan diffusion model": "the TurboDiffusion model loader (load_dit)",
        "Wan video VAE": "the VAE loader (load_vae)",
        "LoRA": "a LoRA loader",
    }
    hint = next((v for k, v in fits.items() if kind.startswith(k)), None)
    where = f"; load it with {hint}" if hint else ""
    return CheckpointError(
        f"{name} is a {kind}, not the umT5-XXL text encoder{where}. The text encoder file is "
        f"umt5_xxl_*.safetensors (ComfyUI) or models_t5_umt5-xxl-enc-bf16.pth (Wan / TurboDiffusion)"
    )


def _scale_for(key: str, scales: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if not key.endswith(".weight"):
        return None
    base = key[: -len(".weight")]
    for suffix in _SCALE_SUFFIXES:
        if base + suffix in scales:
            return scales.pop(base + suffix)
    return None


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, key: str) -> torch.Tensor:
    """weight * scale in fp32; the scale is per tensor or per output row."""
    scale = scale.float()
    if scale.numel() > 1 and scale.ndim == 1 and scale.shape[0] == weight.shape[0] and weight.ndim == 2:
        scale = scale[:, None]  # [out] -> [out, 1]
    elif scale.numel() == 1:
        scale = scale.reshape(())
    try:
        return weight.float() * scale
    except RuntimeError:
        raise CheckpointError(f"{key}: scale of shape {tuple(scale.shape)} does not fit weight "
                              f"{tuple(weight.shape)}") from None


def _pop_embedded_tokenizer(sd: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The `spiece_model` tensor (ComfyUI: the serialized tokenizer), removed from `sd`."""
    found = None
    for key in [k for k in sd if k == EMBEDDED_KEY or k.endswith("." + EMBEDDED_KEY)]:
        found = sd.pop(key)
    return found


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})" if keys else "none"


# ---------------------------------------------------------------------------
# Small helpers

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16, torch.float32):
            return dtype
    elif str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(f"text encoder dtype {dtype!r}: use bf16, fp16 or fp32")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
