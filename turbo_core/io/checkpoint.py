"""Reading model files safely, and telling what kind of model a file holds.

Only two readers exist: safetensors, and torch.load(weights_only=True) for
.pth/.pt. Nothing here ever unpickles arbitrary objects.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile

import torch

log = logging.getLogger("turbo_core")

SAFETENSORS_EXT = (".safetensors", ".sft")
TORCH_EXT = (".pth", ".pt", ".bin", ".ckpt")

# Wrapper keys seen around a state dict in training / third-party files.
_WRAPPER_KEYS = ("state_dict", "model", "module", "net", "ema")


class CheckpointError(ValueError):
    """A model file that cannot be used, with a message that names the fix."""


def read_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors or .pth/.pt file, keys as stored.

    .pth files go through torch.load(weights_only=True, mmap=True), so a file that
    would run code when unpickled is refused before anything runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        return _read_safetensors(path, size, device)
    if low.endswith(TORCH_EXT):
        return _read_torch(path, size, device)
    raise CheckpointError(
        f"{path}: unknown file type; use a .safetensors file (or a .pth/.pt saved with torch.save)"
    )


def _read_safetensors(path: str, size: int, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt ({err}); download it again"
        ) from None


def _read_torch(path: str, size: int, device) -> dict[str, torch.Tensor]:
    def load(mmap: bool):
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as err:
            # Legacy (pre-zip) .pth files cannot be memory-mapped.
            if "mmap" not in str(err):
                raise
            obj = load(mmap=False)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} contains Python objects other than tensors, so it was refused without running it "
            f"(only plain tensor files are loaded). Use a .safetensors version of this model. "
            f"[{str(err).splitlines()[0]}]"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt ({str(err).splitlines()[0]}); download it again"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside {"state_dict": {...}} style wrappers."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(f"{path} holds no tensors: it is not a model checkpoint")


# ---------------------------------------------------------------------------
# What kind of model is this?  Used to refuse a wrong file with a useful message.

def _has(keys, *fragments) -> bool:
    return any(any(f in k for f in fragments) for k in keys)


def guess_kind(sd: dict[str, torch.Tensor]) -> str:
    """A short description of what the state dict looks like."""
    keys = list(sd)
    if _has(keys, "head.modulation", "self_attn.norm_q", "patch_embedding.weight"):
        return "Wan diffusion model (DiT)"
    if _has(keys, "lora_A", "lora_B", "lora_down", "lora_up", ".alpha"):
        return "LoRA"
    if _has(keys, "encoder.downsamples.", "decoder.upsamples.", "decoder.middle."):
        z = next((v.shape[0] for k, v in sd.items() if k.endswith("conv2.weight") and v.ndim == 5
                  and not k.startswith(("encoder", "decoder"))), None)
        return f"Wan video VAE ({z} latent channels)" if z else "Wan video VAE"
    if _has(keys, "first_stage_model.", "encoder.down.", "decoder.up.", "quant_conv"):
        return "image VAE (Stable Diffusion / Flux family)"
    if _has(keys, "token_embedding.weight", "shared.weight", "encoder.block.", "ffn.gate.0"):
        return "T5 / umT5 text encoder"
    if _has(keys, "vision_model.", "visual.", "text_model.", "logit_scale"):
        return "CLIP model"
    if _has(keys, "input_blocks.", "double_blocks.", "joint_blocks.", "transformer_blocks.", "down_blocks."):
        return "image diffusion model (not Wan video)"
    if _has(keys, "model.layers.", "lm_head"):
        return "language model"
    return "unknown model"


def read_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keys with shapes and dtypes as meta tensors, without reading the weights.

    For inspecting 30 GB files: safetensors headers are parsed directly; .pth files
    are memory-mapped (still weights_only) and never copied into RAM.
    """
    path = os.fspath(path)
    if path.lower().endswith(SAFETENSORS_EXT):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                out = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.uint8),
                                           device="meta")
                return out
        except SafetensorError as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); download it again") from None
    return {k: v.to("meta") for k, v in read_state_dict(path).items()}


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
