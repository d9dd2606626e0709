"""W8A8 Triton kernels (activation quantisation + int8 GEMM) vs the references.

Runs in triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Checks (all bit-exact):
  * codes and scales == quantize_int8 and == fixture int8_linear (incl. the edge rows:
    +amax -> 127, -amax -> -128, exact k+0.5 ties -> even);
  * GEMM == w8a8_linear_reference (one FMA per K tile, as the official kernel) and within
    the fixture's 1 bf16 ulp of y_w8a8_kernel_order_bf16, for partial row/column tiles, K not
    a multiple of 128, bf16/fp16, with/without bias; an fp32 output shows the FMA itself.
"""
import os
import random

import pytest
import torch
from conftest import load_fixture, rel_l2
from kernel_probes import every_finite, gelu_probe
from turbo_core.kernels import w8a8_triton
from turbo_core.quant.int8 import Int8Linear, quantize_int8, w8a8_linear_reference

SEED = int(os.environ.get("TURBO_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def test_codes_and_scales_match_fixture():
    fix = load_fixture("int8_linear.safetensors")
    for src, codes, scale in [("weight_bf16", "int8_weight", "scale"), ("x_bf16", "x_int8", "x_scale"),
                              ("edge_in_bf16", "edge_int8", "edge_scale")]:
        q, s = w8a8_triton.quantize_act(fix[src])
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q, fix[codes]), src
        assert torch.equal(s, fix[scale]), src
    q, _ = w8a8_triton.quantize_act(fix["edge_in_bf16"])
    assert q[0].max() == 127 and q[0].min() == -128
    assert q[1, :8].tolist() == [0, 2, 2, 0, -2, -2, 126, -128]


@pytest.mark.parametrize("m,k,dtype", [(1, 128, torch.bfloat16), (200, 256, torch.float16),
                                       (333, 200, torch.bfloat16), (129, 384, torch.float32)])
def test_quantize_bit_exact_random(m, k, dtype):
    g = torch.Generator().manual_seed(SEED + m)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[None, :]).to(dtype)
    q, s = w8a8_triton.quantize_act(x)
    rq, rs = quantize_int8(x)
    assert torch.equal(q, rq), f"seed {SEED}"
    assert torch.equal(s, rs), f"seed {SEED}"
    # exact ties: a tile whose amax is 128 gives mult 1, so k+0.5 values must round to even
    t = torch.randn(128, 128, generator=g).clamp(-100, 100).to(dtype)
    t[0, :5] = torch.tensor([128.0, 2.5, -3.5, 0.5, -128.0], dtype=dtype)
    qt, _ = w8a8_triton.quantize_act(t)
    assert qt[0, :5].tolist() == [127, 2, -4, 0, -128]
    assert torch.equal(qt, quantize_int8(t)[0])
    zeros = torch.zeros(130, 130, dtype=torch.bfloat16)  # amax clamps to 1e-8
    qz, sz = w8a8_triton.quantize_act(zeros)
    assert not qz.any() and torch.equal(sz, quantize_int8(zeros)[1])


def test_gemm_matches_fixture_kernel_order():
    fix = load_fixture("int8_linear.safetensors")
    y = w8a8_triton.W8A8Kernel()(fix["x_bf16"], fix["int8_weight"], fix["scale"], fix["bias"])
    assert y.dtype == torch.bfloat16 and y.shape == (300, 384)
    assert torch.equal(y, fix["y_w8a8_kernel_order_bf16"])
    assert rel_l2(y, fix["y_w8a8_f64"]) <= 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("shape,n,dtype,has_bias", [
    ((200, 256), 128, torch.bfloat16, True),
    ((2, 150, 200), 333, torch.float16, True),
    ((1, 384), 256, torch.bfloat16, False),
    ((3, 43, 128), 300, torch.bfloat16, True),
])
def test_gemm_bit_exact_random(shape, n, dtype, has_bias):
    g = torch.Generator().manual_seed(SEED + n)
    k = shape[-1]
    x = (torch.randn(*shape, generator=g) * 2).to(dtype)
    qw, sw = quantize_int8(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16) if has_bias else None
    y = w8a8_triton.W8A8Kernel()(x, qw, sw, bias)
    expect = w8a8_linear_reference(x, qw, sw, bias)
    assert y.shape == expect.shape and y.dtype == dtype
    assert torch.equal(y, expect), f"seed {SEED}: max diff {(y.float() - expect.float()).abs().max()}"


@pytest.mark.parametrize("m,k,n,dtype,gated", [(200, 256, 136, torch.bfloat16, True), (130, 384, 300, torch.float16, True),
                                               (65, 128, 256, torch.bfloat16, False)])
def test_gemm_residual_epilogue_is_the_gated_add(m, k, n, dtype, gated):
    """residual + y * gate.to(dtype) from the epilogue == torch's ops in dtype on the reference y,
    bit for bit (each product and sum rounded to dtype), also written into rows of a larger tensor."""
    g = torch.Generator().manual_seed(SEED + m)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    qw, sw = quantize_int8(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    res = (torch.randn(m, n, generator=g) * 3).to(dtype)
    gate = torch.randn(1, 1, n, generator=g) if gated else None  # fp32, as the modulation's chunks
    y = w8a8_linear_reference(x, qw, sw, bias)
    expect = res + y * gate.to(dtype).reshape(n) if gated else res + y
    xq, xs = w8a8_triton.quantize_act(x)
    got = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, dtype, residual=res, gate=gate)
    assert torch.equal(got, expect), f"seed {SEED}: {(got != expect).sum()} differ"
    if gated:  # the product is rounded before the add: one rounding of r + y * g would differ
        assert not torch.equal(got, (res.float() + y.float() * gate.to(dtype).float().reshape(n)).to(dtype))
    big = torch.full((m + 7, n), 5.0, dtype=dtype)
    w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, dtype, residual=res, gate=gate, out=big[3:3 + m])
    assert torch.equal(big[3:3 + m], expect) and (big[:3] == 5).all() and (big[3 + m:] == 5).all()
    with pytest.raises(ValueError, match="residual must be"):
        w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, dtype, residual=res.t())
    with pytest.raises(ValueError, match="gate must be"):
        w8a8_triton.w8a8_gemm(xq, xs, qw, sw, bias, dtype, gate=torch.ones(n))


def test_gemm_fp32_accumulator_is_one_fma_per_k_tile():
    """An fp32 output shows the accumulator itself: each K tile is added with one rounding
    (the official kernel's FFMA), which a separate multiply and add would miss."""
    g = torch.Generator().manual_seed(SEED)
    m, k, n = 130, 640, 136
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)[None, :]
    qw, sw = quantize_int8(torch.randn(n, k, generator=g) / k ** 0.5)
    qx, sx = quantize_int8(x)
    y = w8a8_triton.w8a8_gemm(qx, sx, qw, sw, None, torch.float32)
    assert torch.equal(y, w8a8_linear_reference(x, qw, sw)), f"seed {SEED}"
    # the same sums with a separately rounded multiply and add differ somewhere
    acc = torch.zeros(m, n)
    for kt in range(k // 128):
        cols = slice(kt * 128, (kt + 1) * 128)
        part = qx[:, cols].float() @ qw[:, cols].float().t()
        acc = acc + part * (sx[torch.arange(m) // 128, kt][:, None] * sw[torch.arange(n) // 128, kt][None, :])
    assert not torch.equal(y, acc)


def _int8_layer(k, n, mode="w8a8"):
    """An Int8Linear(k, n) with random int8 weights and bias."""
    layer = Int8Linear(k, n)
    qw, sw = quantize_int8(torch.randn(n, k) / 16)
    layer.int8_weight.copy_(qw)
    layer.scale.copy_(sw)
    layer.bias.data.copy_(torch.randn(n) * 0.1)
    layer.mode = mode
    return layer


def test_int8_linear_module_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(Int8Linear, "kernel", w8a8_triton.W8A8Kernel())
    layer = _int8_layer(256, 200)
    qw, sw = layer.int8_weight, layer.scale
    x = torch.randn(2, 70, 256).to(torch.bfloat16)
    assert Int8Linear.kernel.supports(x)
    assert not Int8Linear.kernel.supports(x.float())
    calls = []
    real = Int8Linear.kernel.__call__
    monkeypatch.setattr(w8a8_triton.W8A8Kernel, "__call__", lambda self, *a: calls.append(1) or real(*a))
    y = layer(x)
    assert calls and torch.equal(y, w8a8_linear_reference(x, qw, sw, layer.bias))


def test_shared_input_quantizes_once_for_several_layers(monkeypatch):
    from turbo_core.quant.int8 import QuantizedInput, shared_input

    monkeypatch.setattr(Int8Linear, "kernel", w8a8_triton.W8A8Kernel())
    layers = []
    for n in (200, 256, 130):  # q/k/v-like layers reading one input
        layers.append(_int8_layer(256, n))
    x = torch.randn(2, 150, 256).to(torch.bfloat16)  # 300 rows: a partial 128-row tile
    quant_launches = []
    real = w8a8_triton.quantize_act
    monkeypatch.setattr(w8a8_triton, "quantize_act", lambda x2, **kw: quant_launches.append(1) or real(x2, **kw))
    shared = shared_input(x, layers)
    assert isinstance(shared, QuantizedInput) and shared.shape == x.shape and len(quant_launches) == 1
    for layer in layers:  # bit-identical to each layer quantising x itself
        assert torch.equal(layer(shared), w8a8_linear_reference(x, layer.int8_weight, layer.scale, layer.bias))
    assert len(quant_launches) == 1
    # anything else gets x back: a layer in dequant mode, a plain Linear, fp32 input, no kernel
    layers[1].mode = "dequant"
    assert shared_input(x, layers) is x
    layers[1].mode = "w8a8"
    assert shared_input(x, layers + [torch.nn.Linear(256, 8)]) is x
    xf = x.float()
    assert shared_input(xf, layers) is xf  # the kernel takes bf16/fp16 only
    monkeypatch.setattr(Int8Linear, "kernel", None)
    assert shared_input(x, layers) is x


def test_dit_with_the_kernel_and_shared_inputs_is_bit_exact(monkeypatch):
    from turbo_core.models.dit_loader import dit_from_state_dict
    from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

    sd = quantize_state_dict(tiny_dit_state_dict(seed=9))
    model = dit_from_state_dict(sd, device="cpu", dtype="bf16", linear="w8a8")
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 16, 2, 6, 8, generator=g), torch.randn(2, 24, 64, generator=g), torch.tensor([400.0, 900.0])
    monkeypatch.setattr(Int8Linear, "kernel", None)
    reference = model(x, t, ctx)  # every layer through w8a8_linear_reference
    monkeypatch.setattr(Int8Linear, "kernel", w8a8_triton.W8A8Kernel())
    assert torch.equal(model(x, t, ctx), reference)  # the kernel, q/k/v and cross k/v sharing one quantisation


@pytest.mark.parametrize("shape,chunk", [((1, 200, 384), 0), ((2, 150, 256), 0), ((1, 300, 640), 128)])
@pytest.mark.parametrize("mode", ["affine", "adaln"])
def test_quantize_norm_gives_the_codes_of_the_norm(shape, chunk, mode, monkeypatch):
    """Codes made from x and the norm's row stats == quantize_act of the normed tensor the fused
    norm returns, bit for bit (whole-row and chunked stats kernels; one and two videos, whose AdaLN
    shift / scale differ; partial row and column tiles)."""
    from turbo_core.kernels import residual_norm_triton as rn

    if chunk:
        monkeypatch.setattr(rn, "_launch_shape", lambda d: (1, 4, chunk))
    g = torch.Generator().manual_seed(SEED + shape[1])
    b, n, d = shape
    x = (torch.randn(*shape, generator=g) * 3 + torch.randn(b, n, 1, generator=g)).to(torch.bfloat16)
    if mode == "affine":
        params = dict(weight=torch.randn(d, generator=g) * 0.3 + 1, bias=torch.randn(d, generator=g) * 0.2)
    else:
        shift, scale = (torch.randn(b, 6, d, generator=g) * 0.5).chunk(6, dim=1)[:2]
        params = dict(shift=shift, scale=scale)
    normed = rn.norm(x, 1e-6, **params)
    q, s = w8a8_triton.quantize_norm(x, rn.norm_stats(x, 1e-6), **params)
    rq, rs = w8a8_triton.quantize_act(normed.reshape(-1, d))
    assert torch.equal(s, rs), f"seed {SEED}"
    assert torch.equal(q, rq), f"seed {SEED}: {(q != rq).sum()} codes differ"


@pytest.mark.parametrize("ffn_chunk", [0, 128])
def test_dit_residual_adds_in_the_gemm_epilogue(monkeypatch, ffn_chunk):
    """With the fused row kernels, the self-attention and cross-attention output projections and
    ffn.2 add the residual in the W8A8 GEMM's epilogue, and norm1 / norm3 / norm2 go straight to
    int8 codes for their W8A8 readers (`quantize_norm`): bit-identical to the reference W8A8 layers
    with the fused add + norm kernels. FFN passes of 128 tokens write rows of the output (128,
    128, 32) and read 128-row slices of the codes; two batch rows with different gates keep the
    separate add (and their FFN passes the normed tensor)."""
    from turbo_core.kernels import residual_norm_triton
    from turbo_core.models.dit import Block
    from turbo_core.models.dit_loader import dit_from_state_dict
    from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

    model = dit_from_state_dict(quantize_state_dict(tiny_dit_state_dict(seed=4)), device="cpu", dtype="bf16",
                                linear="w8a8")
    model.set_ffn_chunk(ffn_chunk)
    monkeypatch.setattr(Block, "fused_ops", residual_norm_triton)
    g = torch.Generator().manual_seed(SEED)
    x, ctx = torch.randn(2, 16, 3, 16, 24, generator=g), torch.randn(2, 24, 64, generator=g)
    t = torch.tensor([300.0, 800.0])
    epilogue_adds, norm_codes = [], []
    real, real_norm = w8a8_triton.w8a8_gemm, w8a8_triton.quantize_norm
    monkeypatch.setattr(w8a8_triton, "w8a8_gemm",
                        lambda *a, **kw: epilogue_adds.append(kw["residual"] is not None) or real(*a, **kw))
    monkeypatch.setattr(w8a8_triton, "quantize_norm", lambda *a, **kw: norm_codes.append(1) or real_norm(*a, **kw))
    for b in (1, 2):
        monkeypatch.setattr(Int8Linear, "kernel", None)
        reference = model(x[:b], t[:b], ctx[:b])  # w8a8_linear_reference, fused add + norm kernels
        monkeypatch.setattr(Int8Linear, "kernel", w8a8_triton.W8A8Kernel())
        epilogue_adds.clear()
        norm_codes.clear()
        assert torch.equal(model(x[:b], t[:b], ctx[:b]), reference), f"B={b}, seed {SEED}"
        passes = 3 if ffn_chunk else 1
        # per block: self-attn o (gated) and cross-attn o (no gate: also for B=2), ffn.2 per pass (gated)
        assert sum(epilogue_adds) == len(model.blocks) * ((2 + passes) if b == 1 else 1), (b, epilogue_adds)
        # per block: norm1, norm3, norm2; for B=2 norm1, and norm2 when the FFN runs in one pass
        assert len(norm_codes) == len(model.blocks) * (3 if b == 1 else 2 - bool(ffn_chunk)), (b, norm_codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_every_finite_value(dtype):
    """Every finite 16-bit value (subnormals, the largest, both zeros) in one [rows, 128] input."""
    x = every_finite(dtype)
    q, s = w8a8_triton.quantize_act(x)
    rq, rs = quantize_int8(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    tiny = x[:128].clone()  # a tile of bf16/fp16 subnormals only: their own scale
    q, s = w8a8_triton.quantize_act(tiny)
    assert torch.equal(q, quantize_int8(tiny)[0]) and torch.equal(s, quantize_int8(tiny)[1])


@pytest.mark.filterwarnings("ignore:overflow")  # x**3 of the largest inputs is inf (tanh -> 1, as torch)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_quantize_is_torch_gelu_then_quantize(dtype):
    """The FFN hidden state's fused pass: its GELU bit-identical to torch's tanh GELU on every
    finite input; codes and scales bit-identical to quantising torch's GELU."""
    x = every_finite(dtype).flatten()
    g = gelu_probe(x)
    assert torch.equal(g, torch.nn.functional.gelu(x, approximate="tanh"))
    gen = torch.Generator().manual_seed(SEED)
    for m, k in [(300, 200), (129, 384), (1, 130)]:  # partial tiles
        x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
        q, s = w8a8_triton.quantize_act(x, gelu=True)
        rq, rs = quantize_int8(torch.nn.functional.gelu(x, approximate="tanh"))
        assert torch.equal(q, rq) and torch.equal(s, rs), f"seed {SEED}"


def test_ffn_hidden_state_is_quantised_with_its_gelu(monkeypatch):
    from turbo_core.quant.int8 import QuantizedInput, shared_input

    layer = _int8_layer(200, 96)
    qw, sw = layer.int8_weight, layer.scale
    h = (torch.randn(2, 150, 200) * 2).to(torch.bfloat16)
    gelu = torch.nn.functional.gelu(h, approximate="tanh")
    expect = w8a8_linear_reference(gelu, qw, sw, layer.bias)
    monkeypatch.setattr(Int8Linear, "kernel", w8a8_triton.W8A8Kernel())
    shared = shared_input(h, (layer,), gelu=True)
    assert isinstance(shared, QuantizedInput) and shared.shape == h.shape
    assert torch.equal(layer(shared), expect)
    # in dequant mode, or without the kernel, the caller gets torch's GELU of h
    layer.mode = "dequant"
    assert torch.equal(shared_input(h, (layer,), gelu=True), gelu)
    layer.mode = "w8a8"
    monkeypatch.setattr(Int8Linear, "kernel", None)
    assert torch.equal(layer(shared_input(h, (layer,), gelu=True)), expect)
