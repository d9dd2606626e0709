"""Self-attention backends, selected by name.

The DiT calls `self_attention(q, k, v, backend, ...)` and nothing else, so new
kernels register here without touching the model.
  original  dense softmax attention (torch SDPA)
  sla       sparse-linear attention (Triton kernel on CUDA, PyTorch reference elsewhere)
  sagesla   SLA with int8 q/k and fp8 V (Triton, sm89+), falls back to sla
  auto      sagesla on sm89 / sm90 and newer (on the H100 1.79 vs 1.98 ms at 1.3B-480p,
            ~10% faster at 14B-720p: bench/RESULTS.md), sla on other CUDA GPUs and the
            CPU; if the SageSLA kernel fails to build on a GPU, auto says so once and
            stays on SLA.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from .sla_reference import sla_attention

log = logging.getLogger("turbo_core")

BACKENDS = ("original", "sla", "sagesla", "auto")

# name -> fn(q, k, v, proj_l_weight, proj_l_bias, topk) on [B,L,H,D]. Kernel
# modules add entries; anything missing falls back to the references below.
_FAST: dict[str, Callable] = {}
_said: set[str] = set()
_kernels_tried = False


def register(name: str, fn: Callable) -> None:
    _FAST[name] = fn


def say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B,L,H,D] in, [B,L,H,D] out; full softmax, scale 1/sqrt(D), no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def ensure_kernels(device: torch.device) -> bool:
    """Install the Triton kernels the first time a CUDA tensor needs them."""
    global _kernels_tried
    if device.type != "cuda":
        return False
    if not _kernels_tried:
        _kernels_tried = True
        from .. import kernels

        if not kernels.install():
            say_once(f"Triton kernels unavailable ({kernels.last_error() or 'no triton'}); using PyTorch paths")
    return bool(_FAST)


def resolve(backend: str, device: torch.device) -> str:
    """The backend that will actually run for `backend` on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    # auto: SageSLA-class where int8 q/k and fp8 V tensor cores exist (Ada sm89, Hopper sm90 and
    # newer) unless its kernel already failed here, SLA on other CUDA GPUs and for the PyTorch
    # reference on the CPU / MPS
    if device.type == "cuda" and not _SAGE_FAILED and torch.cuda.is_available() \
            and torch.cuda.get_device_capability(device) >= (8, 9):
        return "sagesla"
    return "sla"


_SAGE_FAILED: list = []  # why the SageSLA kernel failed under "auto" (then auto resolves to SLA)


@torch.compiler.disable  # kernels are called eagerly; compiled blocks break the graph here
def self_attention(q, k, v, backend: str = "original", *, proj_l=None, topk: float = 0.1):
    """Dispatch. proj_l is the layer's (weight, bias) pair or None."""
    name = resolve(backend, q.device)
    if name == "original":
        return dense_attention(q, k, v)
    w, b = proj_l if proj_l is not None else (None, None)
    fast = None
    if ensure_kernels(q.device):
        fast = _FAST.get(name)
        if fast is None and name == "sagesla":
            say_once("attention 'sagesla': this GPU lacks int8/fp8 tensor cores for it; using SLA")
            fast = _FAST.get("sla")
    if fast is not None:
        say_once(f"attention '{backend}': Triton {name} kernel")
        if backend == "auto" and name == "sagesla":
            try:
                return fast(q, k, v, w, b, topk)
            except Exception as exc:  # an arch where the int8/fp8 kernel does not build: keep going on SLA
                _SAGE_FAILED.append(f"{type(exc).__name__}: {exc}")
                log.warning("attention 'auto': SageSLA kernel failed (%s); using SLA from now on",
                            _SAGE_FAILED[0][:300])
                return _FAST["sla"](q, k, v, w, b, topk)
        return fast(q, k, v, w, b, topk)
    say_once(f"attention '{backend}': PyTorch SLA reference on {q.device.type}")
    return sla_attention(q, k, v, w, b, topk=topk)
