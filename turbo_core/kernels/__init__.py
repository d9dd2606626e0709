"""Triton fast paths: SLA / SageSLA attention, the W8A8 int8 linear, fused q/k RMSNorm + RoPE,
fused residual add + LayerNorm + AdaLN.

    from turbo_core import kernels
    kernels.install()   # -> True when the kernels were registered

`install()` registers the attention backends "sla" and "sagesla" (int8 q/k;
fp8 V on sm89/sm90+, fp16 V on sm80/86) with `turbo_core.attention.register`,
sets `Int8Linear.kernel` to the Triton W8A8 kernel object and
`SelfAttention.fused_norm_rope` to the fused RMSNorm + RoPE kernel and
`Block.fused_ops` to the fused residual / LayerNorm / AdaLN kernels. It needs sm80+
(bf16/int8 tensor-core dots). It is idempotent and never raises: without
triton, without a CUDA device (and TRITON_INTERPRET unset) or on an older GPU
it returns False and the PyTorch references stay in use.

Submodules import triton at import time; this module does not.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("turbo_core")

_installed = False
_error: str | None = None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Triton importable and (a CUDA device or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    if _interpret_env():
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def install() -> bool:
    """Register the Triton kernels; True on success (also when already installed)."""
    global _installed, _error
    if _installed:
        return True
    if not available():
        return False
    try:
        import torch

        from ..attention import register
        from ..models.dit import Block, SelfAttention
        from ..quant.int8 import Int8Linear
        from . import norm_rope_triton, residual_norm_triton, sagesla_triton, sla_triton, w8a8_triton

        if not sla_triton.INTERPRET and torch.cuda.get_device_capability() < (8, 0):
            # bf16 / int8 tensor-core dots need sm80+: keep the PyTorch paths
            _error = f"GPU capability {torch.cuda.get_device_capability()} < (8, 0)"
            log.info("turbo_core.kernels: %s, Triton kernels not installed", _error)
            return False
        register("sla", sla_triton.sla_backend)
        register("sagesla", sagesla_triton.sagesla_backend)  # fp8 V on sm89+, fp16 V on sm80/86
        Int8Linear.kernel = w8a8_triton.W8A8Kernel()
        if not sla_triton.INTERPRET:  # CPU models keep the PyTorch ops (tests set it explicitly)
            SelfAttention.fused_norm_rope = norm_rope_triton  # RMSNorm + RoPE of q and k in one pass
            Block.fused_ops = residual_norm_triton  # each residual add + the norm after it in one pass
    except Exception as exc:  # a broken triton install must not break the node pack
        _error = f"{type(exc).__name__}: {exc}"
        log.warning("turbo_core.kernels: Triton kernels not installed (%s)", _error)
        return False
    _installed = True
    return True


def last_error() -> str | None:
    """Why the last install() failed, if it did."""
    return _error
