"""Fused residual add / LayerNorm / AdaLN Triton kernel vs the DiT block's torch ops (CPU interpreter).

References are the block's own torch expressions, with its LayerNorm modules
(`turbo_core.models.dit`). Fresh random inputs each run (TURBO_TEST_SEED to
replay one; the seed is in every failure message).

Tolerances. Residual sums (x + y * gate): bit-identical (the same rounding
points). fp32 norms: max |diff| <= 1e-5 * max |ref|. bf16/fp16 norms: the kernel
sums in another order than torch, so mean / rstd can differ in the last fp32 bit
and flip a rounding to the dtype on a few elements: at most 2e-3 of the elements
may differ, each by at most one ulp of the normed value times |1 + scale| (the
modulation scales a flip of the rounded norm) plus one ulp of the output, plus
2^-21 of the row's largest output and bias/shift (an output that cancels to ~0
keeps the fp32 rounding error of its terms).
"""
import os
import random

import pytest
import torch
import torch.nn.functional as F
from turbo_core.kernels import residual_norm_triton as rn
from turbo_core.models.dit import LayerNorm

SEED = int(os.environ.get("TURBO_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
EPS = 1e-6
MAX_FLIP_FRACTION = 2e-3
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 30, 320), (2, 77, 256), (2, 13, 1536), (1, 3, 5120)]  # (B, L, D)


def _inputs(b, n, d, dtype, salt):
    g = torch.Generator().manual_seed(SEED + salt)
    x = torch.randn(b, n, d, generator=g) * 2
    x[0, 0] = 0.75  # a constant row: variance 0, normed row 0
    if n > 1:
        x[-1, 1] *= 50  # a large row
    y = torch.randn(b, n, d, generator=g) * 3
    mod = torch.randn(b, 6, d, generator=g)  # chunks of it are strided [B, 1, D] views, as in the block
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    norm3 = LayerNorm(d, EPS, affine=True)
    norm3.weight.data.copy_(torch.randn(d, generator=g) * 0.5 + 1)
    norm3.bias.data.copy_(torch.randn(d, generator=g) * 0.1)
    return x.to(dtype), y.to(dtype), shift, scale, gate, norm3


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    e = torch.frexp(x.abs().double().clamp_min(fi.tiny)).exponent.double()
    return torch.clamp_min(fi.eps * torch.pow(2.0, e - 1), fi.tiny * fi.eps)


def _check_norm(out, ref, dtype, what, pre=None, gain=None, offset=None):
    """pre: the rounded plain norm before the modulation, gain: |1 + scale|, offset: the
    added bias or shift (an output that cancels to near 0 keeps the fp32 error of its terms)."""
    assert out.shape == ref.shape and out.dtype == dtype, what
    d = (out.double() - ref.double()).abs()
    if dtype == torch.float32:
        rel = float(d.max() / ref.abs().max())
        assert rel <= 1e-5, f"seed {SEED} {what}: max diff {rel:.3g} * max|ref|"
        return
    bound = _ulp(ref, dtype) + 2.0 ** -21 * (ref.double().abs().amax(-1, keepdim=True) + (0 if offset is None else offset.abs().max()))
    if pre is not None:
        bound = bound + _ulp(pre, dtype) * gain.double()
    flips = int((d > 0).sum())  # a few even where 2e-3 of the elements is less than one (one 200-wide row)
    assert flips <= max(2, MAX_FLIP_FRACTION * d.numel()), f"seed {SEED} {what}: {flips} of {d.numel()} differ"
    worst = float((d / bound).max())
    assert worst <= 1.0 + 1e-9, f"seed {SEED} {what}: a difference of {worst:.3g} x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_block_ops_match_torch(shape, dtype):
    b, n, d = shape
    x, y, shift, scale, gate, norm3 = _inputs(b, n, d, dtype, salt=sum(shape) + DTYPES.index(dtype))
    norm1 = LayerNorm(d, EPS)
    what = f"{shape} {dtype}"

    # norm1 + AdaLN (the modulated input of q/k/v)
    pre = norm1(x)
    ref = torch.addcmul(shift, pre.float(), 1 + scale).to(dtype)
    h = rn.norm(x, EPS, shift=shift, scale=scale)
    # the constant row normalises to exactly 0, so it gives the shift (torch's CPU layer_norm
    # leaves rounding noise of the mean there, which is why it is compared apart)
    assert torch.equal(h[0, 0], shift[0, 0].to(dtype)), f"seed {SEED} constant row {what}"
    _check_norm(h[:, 1:], ref[:, 1:], dtype, f"norm AdaLN {what}", pre[:, 1:], (1 + scale).abs(), shift)

    # gated residual + affine norm3
    x1_ref = x + y * gate.to(dtype)
    n_ref = norm3(x1_ref)
    x1, n3 = rn.add_norm(x, y, gate, EPS, weight=norm3.weight, bias=norm3.bias)
    assert torch.equal(x1, x1_ref), f"seed {SEED} residual {what}"
    _check_norm(n3, n_ref, dtype, f"norm3 {what}", offset=norm3.bias)

    # plain residual + norm2 + AdaLN
    x2_ref = x1_ref + y
    pre = norm1(x2_ref)
    h_ref = torch.addcmul(shift, pre.float(), 1 + scale).to(dtype)
    x2, h = rn.add_norm(x1, y, None, EPS, shift=shift, scale=scale)
    assert torch.equal(x2, x2_ref), f"seed {SEED} residual {what}"
    _check_norm(h, h_ref, dtype, f"norm2 {what}", pre, (1 + scale).abs(), shift)

    # gated residual alone (the FFN's)
    assert torch.equal(rn.gated_add(x, y, gate), x1_ref), f"seed {SEED} gated_add {what}"


def test_strided_rows_and_output_slices():
    b, n, d = 2, 40, 384
    x, y, shift, scale, gate, _ = _inputs(b, n, d, torch.bfloat16, salt=99)
    big = torch.zeros(b, n + 24, d, dtype=torch.bfloat16)
    out = big[:, 8:8 + n]  # batch stride (n + 24) * d: a slice of a larger output
    xs = torch.cat([x, x], dim=-1)[..., :d]  # token stride 2d
    assert not out.is_contiguous() and not xs.is_contiguous()
    ref = x + y * gate.to(torch.bfloat16)
    assert rn.gated_add(xs, y, gate, out=out) is out
    assert torch.equal(out, ref)
    assert not big[:, :8].any() and not big[:, 8 + n:].any()  # nothing outside the slice is written
    # [D] and [1, 1, D] vectors broadcast over the batch, as torch would
    pre = LayerNorm(d, EPS)(xs)
    ref = torch.addcmul(shift[0], pre.float(), 1 + scale[0]).to(torch.bfloat16)
    _check_norm(rn.norm(xs, EPS, shift=shift[0], scale=scale[0])[:, 1:], ref[:, 1:], torch.bfloat16, "broadcast",
                pre[:, 1:], (1 + scale[0]).abs(), shift)  # row 0 is the constant one (see above)
    assert torch.equal(rn.norm(xs, EPS, shift=shift[0, 0], scale=scale[0, 0]),
                       rn.norm(xs, EPS, shift=shift[:1], scale=scale[:1]))
    # a last dim with a stride is copied first (same result)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(rn.gated_add(xt, y, gate), rn.gated_add(x, y, gate))


def test_bad_inputs_raise_and_supports():
    x = torch.randn(2, 4, 256, dtype=torch.bfloat16)
    v = torch.randn(2, 1, 256)
    with pytest.raises(ValueError, match=r"must match x"):
        rn.gated_add(x, x[:, :3], v)
    with pytest.raises(ValueError, match=r"gate must be \[B, 1, 256\]"):
        rn.gated_add(x, x, torch.randn(3, 1, 256))
    with pytest.raises(ValueError, match=r"shift must be"):
        rn.norm(x, EPS, shift=torch.randn(2, 1, 128), scale=v)
    with pytest.raises(ValueError, match=r"weight and bias must be \[256\]"):
        rn.add_norm(x, x, None, EPS, weight=torch.ones(128), bias=torch.zeros(256))
    with pytest.raises(ValueError, match=r"out must be"):
        rn.gated_add(x, x, v, out=torch.empty(2, 4, 256))  # wrong dtype
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        rn.gated_add(x[0], x[0], v)
    assert rn.supports(x) and rn.supports(x.half()) and rn.supports(x.float())
    assert not rn.supports(x.double()) and not rn.supports(x[0])
    empty = torch.randn(2, 0, 256)
    assert rn.gated_add(empty, empty, v).shape == (2, 0, 256)
    assert rn.add_norm(empty, empty, None, EPS, shift=v, scale=v)[1].shape == (2, 0, 256)


def test_matches_torch_layer_norm_statistics():
    """The kernel's LayerNorm is F.layer_norm's (biased variance, eps inside the sqrt)."""
    x = torch.randn(3, 7, 640, dtype=torch.float64).float() * 5 + 3
    zero = torch.zeros(1, 1, 640)
    out = rn.norm(x, 1e-3, shift=zero, scale=zero)
    ref = F.layer_norm(x.double(), (640,), eps=1e-3).float()
    assert float((out - ref).abs().max()) <= 2e-6 * float(ref.abs().max())


@pytest.mark.parametrize("chunk", [64, 128])
@pytest.mark.parametrize("shape", [(1, 5, 320), (2, 3, 256), (1, 2, 200)], ids=str)
def test_row_chunked_kernel_matches_torch(shape, chunk, monkeypatch):
    """The kernel for wide rows (14B: D = 5120), one row per program in chunks: same checks,
    D a multiple of the chunk or not."""
    monkeypatch.setattr(rn, "_launch_shape", lambda d: (1, 1, chunk))
    test_block_ops_match_torch(shape, torch.bfloat16)
    test_block_ops_match_torch(shape, torch.float32)
