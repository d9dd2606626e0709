"""int8 tile quantisation and the W8A8 reference against fixture int8_linear.

Tolerance (fixtures README): codes and scales exact; kernel-order output within
1 bf16 ulp (we are bit-exact); float64 formula 1e-9 relative.
"""
import torch

from conftest import load_fixture, rel_l2
from turbo_core.quant.int8 import Int8Linear, dequantize_int8, quantize_int8, w8a8_linear_reference


def test_codes_and_scales_exact():
    fix = load_fixture("int8_linear.safetensors")
    for src, codes, scale in [("weight_bf16", "int8_weight", "scale"), ("x_bf16", "x_int8", "x_scale"),
                              ("edge_in_bf16", "edge_int8", "edge_scale")]:
        q, s = quantize_int8(fix[src])
        assert torch.equal(q, fix[codes]), src
        assert torch.equal(s, fix[scale]), src


def test_edge_codes_round_half_even_and_saturate():
    fix = load_fixture("int8_linear.safetensors")
    q, _ = quantize_int8(fix["edge_in_bf16"])
    assert q[0].max() == 127 and q[0].min() == -128
    assert q[1, :8].tolist() == [0, 2, 2, 0, -2, -2, 126, -128]


def test_w8a8_kernel_order_bit_exact():
    fix = load_fixture("int8_linear.safetensors")
    y = w8a8_linear_reference(fix["x_bf16"], fix["int8_weight"], fix["scale"], fix["bias"])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fix["y_w8a8_kernel_order_bf16"])


def test_w8a8_formula_float64():
    fix = load_fixture("int8_linear.safetensors")
    qx, sx, qw, sw = fix["x_int8"], fix["x_scale"], fix["int8_weight"], fix["scale"]
    y = torch.zeros(300, 384, dtype=torch.float64)
    for kt in range(2):
        cols = slice(kt * 128, (kt + 1) * 128)
        part = qx[:, cols].double() @ qw[:, cols].double().T
        y += part * sx[torch.arange(300) // 128, kt, None].double() * sw[None, torch.arange(384) // 128, kt].double()
    y += fix["bias"].double()
    assert rel_l2(y, fix["y_w8a8_f64"]) <= 1e-9


def test_dequantize_roundtrip_and_module():
    w = torch.randn(300, 200)
    q, s = quantize_int8(w)
    assert rel_l2(dequantize_int8(q, s), w) < 1e-2
    layer = Int8Linear(200, 300, dtype=torch.float32)
    layer.int8_weight.copy_(q)
    layer.scale.copy_(s)
    layer.bias.data.zero_()
    x = torch.randn(5, 7, 200)
    dense = x @ dequantize_int8(q, s).T
    assert rel_l2(layer(x), dense) < 1e-6
    layer.mode = "w8a8"
    assert rel_l2(layer(x), dense) < 2e-2
