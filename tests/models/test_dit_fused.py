"""The DiT with the fused RMSNorm + RoPE Triton kernel (CPU interpreter) computes the same network."""
import torch

from conftest import max_abs, rel_l2
from turbo_core.kernels import norm_rope_triton
from turbo_core.models.dit import SelfAttention
from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.tiny import tiny_dit_state_dict


def test_fused_norm_rope_in_the_dit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 6, 8, generator=g)
    ctx = torch.randn(1, 24, 64, generator=g)
    t = torch.tensor([500.0])
    outs = {}
    for dtype in ("fp32", "bf16"):
        model = dit_from_state_dict(tiny_dit_state_dict(seed=7), device="cpu", dtype=dtype)
        monkeypatch.setattr(SelfAttention, "fused_norm_rope", None)
        plain = model(x, t, ctx)
        monkeypatch.setattr(SelfAttention, "fused_norm_rope", norm_rope_triton)
        outs[dtype] = (model(x, t, ctx), plain)
    fused, plain = outs["fp32"]
    assert max_abs(fused, plain) <= 2e-6 * float(plain.abs().max())  # measured 3.7e-7
    fused, plain = outs["bf16"]  # a few 1-ulp flips of q/k in bf16 propagate through 2 blocks
    assert rel_l2(fused, plain) <= 4e-3  # measured 0 .. 1.1e-3
