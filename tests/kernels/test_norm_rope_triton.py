"""Fused RMSNorm + RoPE Triton kernel vs the DiT's torch path (CPU interpreter).

Reference: `apply_rope(RMSNorm(C)(y).view(B, L, H, 128), freqs)` from
turbo_core.models.dit, freqs built from `rope_angles`. Fresh random inputs each
run (TURBO_TEST_SEED to replay one; the seed is in every failure message).

Tolerances. fp32: max |diff| <= 1e-5 * max |ref| (measured ~1.9e-7). bf16/fp16:
both paths round the normed values to the dtype before the rotation, but the
kernel sums the squares in another order than torch, so its rstd can differ in
the last fp32 bit and flip that rounding on a few elements (measured: at most
2.6e-4 of the elements, 1 of 3840, in fp16; fewer in bf16). One flipped input
of a pair moves each rotated output by <= 1 ulp of the pair's magnitude
|z_2i + i z_2i+1| (which the rotation keeps); that can be several ulps of a
small output, so the bound is in ulps of the pair magnitude: <= 1.5 (two flips
in one pair: sqrt(2) ulp, on a finer output grid; measured max 1.0 here, 1.5 on
an H100 vs torch CUDA in bf16 and fp16).
"""
import os
import random

import pytest
import torch
from turbo_core.kernels import norm_rope_triton
from turbo_core.models.dit import RMSNorm, apply_rope, rope_angles

SEED = int(os.environ.get("TURBO_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
EPS = 1e-6
MAX_FLIP_FRACTION = 2e-3  # measured <= 2.6e-4 (7 flips of 3840 allowed on the smallest case)
MAX_PAIR_ULPS = 1.5


def _inputs(b, t, h, w, heads, dtype, salt):
    g = torch.Generator().manual_seed(SEED + salt)
    n, c = t * h * w, heads * 128
    y = torch.randn(b, n, c, generator=g) * 3
    y[0, 0] = 0.0  # an all-zero row: rstd = 1/sqrt(eps), output 0
    if n > 1:
        y[-1, 1] *= 64  # a large row (still finite in fp16 squares: fp32 sums)
    weight = torch.randn(c, generator=g) * 0.5 + 1
    a = rope_angles(t, h, w)
    freqs = torch.polar(torch.ones_like(a), a)
    return y.to(dtype), weight, freqs


def _reference(y, weight, freqs, heads):
    b, n, c = y.shape
    norm = RMSNorm(c, EPS)
    norm.weight.data.copy_(weight)
    z = norm(y)
    return apply_rope(z.view(b, n, heads, 128), freqs), z.view(b, n, heads, 128)


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |x| (subnormal spacing near 0), in float64."""
    fi = torch.finfo(dtype)
    e = torch.frexp(x.abs().double().clamp_min(fi.tiny)).exponent.double()
    return torch.clamp_min(fi.eps * torch.pow(2.0, e - 1), fi.tiny * fi.eps)


def _check(out, ref, z, dtype, what):
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous(), what
    d = (out.double() - ref.double()).abs()
    if dtype == torch.float32:
        rel = float(d.max() / ref.abs().max())
        assert rel <= 1e-5, f"seed {SEED} {what}: max diff {rel:.3g} * max|ref|"
        return rel
    # magnitude of each complex pair (2i, 2i+1), broadcast back to both channels
    pair = z.double().unflatten(-1, (64, 2)).norm(dim=-1, keepdim=True)
    ulps = d / _ulp(pair.expand(*pair.shape[:-1], 2).flatten(-2), dtype)
    frac = float((d > 0).double().mean())
    worst = float(ulps.max())
    assert frac <= MAX_FLIP_FRACTION, f"seed {SEED} {what}: {frac:.3g} of the elements differ"
    assert worst <= MAX_PAIR_ULPS, f"seed {SEED} {what}: max diff {worst} ulp of the pair magnitude"
    return frac, worst


SHAPES = [  # (B, t, h, w, heads): L = 30, 77, 72, 30, none a power of two
    (1, 2, 3, 5, 1),
    (2, 1, 7, 11, 2),
    (1, 3, 4, 6, 3),
    (2, 2, 3, 5, 2),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_path(shape, dtype):
    b, t, h, w, heads = shape
    y, weight, freqs = _inputs(b, t, h, w, heads, dtype, salt=hash(shape) % 1000 + DTYPES.index(dtype))
    ref, z = _reference(y, weight, freqs, heads)
    out = norm_rope_triton.norm_rope(y, weight, freqs, EPS, heads)
    _check(out, ref, z, dtype, f"{shape} {dtype}")
    assert not out[0, 0].any()  # the zero row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_inputs(dtype):
    t, h, w, heads = 1, 3, 5, 2
    n, c = t * h * w, heads * 128
    big, weight, freqs = _inputs(3, t, h, w, 3 * heads, dtype, salt=7)
    weight = weight[:c].contiguous()
    cases = {
        "batch slice": big[::2, :, :c],  # batch stride 2*L*3C, token stride 3C
        "qkv part": big[1:, :, c:2 * c],  # a fused qkv output's k: token stride 3C
        "last dim strided": big[:2, :, :c].transpose(1, 2).contiguous().transpose(1, 2),
    }
    a = rope_angles(t, h, w)
    cos_sin = torch.complex(torch.cos(a), torch.sin(a))  # not bitwise polar's values
    for name, y in cases.items():
        assert y.shape == (2, n, c) and not y.is_contiguous(), name
        ref, z = _reference(y, weight, freqs, heads)
        out = norm_rope_triton.norm_rope(y, weight, freqs, EPS, heads)
        _check(out, ref, z, dtype, f"{name} {dtype}")
        if name == "qkv part":
            # the strided read equals the read of a contiguous copy, bit for bit
            assert torch.equal(out, norm_rope_triton.norm_rope(y.contiguous(), weight, freqs, EPS, heads))
            # freqs also as their fp32 [L, 64, 2] view, and as torch.complex(cos, sin)
            assert torch.equal(out, norm_rope_triton.norm_rope(y, weight, torch.view_as_real(freqs), EPS, heads))
            ref2, _ = _reference(y, weight, cos_sin, heads)
            _check(norm_rope_triton.norm_rope(y, weight, cos_sin, EPS, heads), ref2, z, dtype, f"cos/sin {dtype}")


def test_bad_shapes_raise():
    w256 = torch.ones(256)
    freqs = torch.polar(torch.ones(4, 64), torch.zeros(4, 64))
    with pytest.raises(ValueError, match="head dim must be 128"):
        norm_rope_triton.norm_rope(torch.randn(1, 4, 256), w256, freqs, EPS, 4)  # 64 per head
    with pytest.raises(ValueError, match="head dim must be 128"):
        norm_rope_triton.norm_rope(torch.randn(1, 4, 200), torch.ones(200), freqs, EPS, 2)
    with pytest.raises(ValueError, match="not a multiple of heads"):
        norm_rope_triton.norm_rope(torch.randn(1, 4, 256), w256, freqs, EPS, 3)
    with pytest.raises(ValueError, match="freqs must be"):
        norm_rope_triton.norm_rope(torch.randn(1, 5, 256), w256, freqs, EPS, 2)  # L mismatch
    with pytest.raises(ValueError, match="weight must be"):
        norm_rope_triton.norm_rope(torch.randn(1, 4, 256), torch.ones(128), freqs, EPS, 2)
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        norm_rope_triton.norm_rope(torch.randn(4, 256), w256, freqs, EPS, 2)


def test_supports_and_empty():
    y = torch.randn(1, 4, 256, dtype=torch.bfloat16)
    assert norm_rope_triton.supports(y) and norm_rope_triton.supports(y, 2)
    assert not norm_rope_triton.supports(y, 4)  # head dim 64
    assert norm_rope_triton.supports(y.half()) and norm_rope_triton.supports(y.float())
    assert not norm_rope_triton.supports(y.double())
    assert not norm_rope_triton.supports(torch.randn(1, 4, 200))
    assert not norm_rope_triton.supports(torch.randn(4, 256))
    out = norm_rope_triton.norm_rope(torch.randn(2, 0, 256), torch.ones(256),
                                     torch.ones(0, 64, dtype=torch.complex64), EPS, 2)
    assert out.shape == (2, 0, 2, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_alone_matches_the_module(dtype):
    g = torch.Generator().manual_seed(SEED + 11)
    for b, n, heads in [(1, 30, 1), (2, 77, 3), (1, 5, 40)]:
        c = heads * 128
        y = (torch.randn(b, n, c, generator=g) * 3).to(dtype)
        y[0, 0] = 0.0
        weight = torch.randn(c, generator=g) * 0.5 + 1
        norm = RMSNorm(c, EPS)
        norm.weight.data.copy_(weight)
        ref = norm(y)
        out = norm_rope_triton.rms_norm(y, weight, EPS)
        assert out.shape == ref.shape and out.dtype == dtype and not out[0, 0].any()
        d = (out.double() - ref.double()).abs()
        if dtype == torch.float32:
            assert float(d.max()) <= 1e-5 * float(ref.abs().max()), f"seed {SEED}"
        else:  # the same flips of the rounding as norm_rope's first rounding point, 1 ulp each
            assert float((d > 0).double().mean()) <= MAX_FLIP_FRACTION, f"seed {SEED}"
            assert bool((d <= _ulp(ref, dtype)).all()), f"seed {SEED}"
        # a strided input (token stride 2C, as a slice of a wider output) gives the same result
        strided = torch.cat([y, y], dim=-1)[..., :c]
        assert torch.equal(norm_rope_triton.rms_norm(strided, weight, EPS), out)
    with pytest.raises(ValueError, match="C a multiple of 128"):
        norm_rope_triton.rms_norm(torch.randn(1, 4, 200), torch.ones(200), EPS)
    with pytest.raises(ValueError, match="weight must be"):
        norm_rope_triton.rms_norm(torch.randn(1, 4, 256), torch.ones(128), EPS)
