"""The DiT with the fused Triton kernels (RMSNorm + RoPE; residual add + LayerNorm + AdaLN) computes
the same network (CPU interpreter)."""
import pytest
import torch

from conftest import max_abs, rel_l2
from turbo_core.kernels import norm_rope_triton, residual_norm_triton
from turbo_core.models.dit import Block, SelfAttention
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


@pytest.mark.parametrize("ffn_chunk", [0, 128])
def test_fused_residual_norms_in_the_dit(monkeypatch, ffn_chunk):
    # latent [2,16,3,16,24] -> 288 tokens per row: with ffn_chunk=128 the FFN residual is
    # written by the kernel into slices of its output (passes of 128, 128, 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 16, 24, generator=g)
    ctx = torch.randn(2, 24, 64, generator=g)
    t = torch.tensor([300.0, 800.0])  # a different modulation per batch row
    outs = {}
    for dtype in ("fp32", "bf16"):
        model = dit_from_state_dict(tiny_dit_state_dict(seed=5), device="cpu", dtype=dtype)
        model.set_ffn_chunk(ffn_chunk)
        monkeypatch.setattr(Block, "fused_ops", None)
        plain = model(x, t, ctx)
        monkeypatch.setattr(Block, "fused_ops", residual_norm_triton)
        outs[dtype] = (model(x, t, ctx), plain)
    fused, plain = outs["fp32"]
    assert max_abs(fused, plain) <= 2e-6 * float(plain.abs().max())
    fused, plain = outs["bf16"]  # residual sums are bit-exact; rare 1-ulp flips of the norms propagate
    assert rel_l2(fused, plain) <= 4e-3


def test_compiled_blocks_keep_the_torch_ops(monkeypatch):
    """Under torch.compile the fused kernels step aside (inductor fuses the torch ops itself)."""
    monkeypatch.setattr(Block, "fused_ops", residual_norm_triton)
    model = dit_from_state_dict(tiny_dit_state_dict(seed=5), device="cpu", dtype="fp32")
    x = torch.randn(1, 3, 256)
    assert model.blocks[0]._fused(x) is residual_norm_triton
    seen = []
    probe = torch.compile(lambda t: seen.append(model.blocks[0]._fused(t)) or t + 1, backend="eager")
    probe(x)
    assert seen == [None]
