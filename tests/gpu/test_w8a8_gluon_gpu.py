"""The sm90 Gluon W8A8 GEMM (no CPU interpreter for Gluon, so it is checked here, on the GPU):
every config bit-identical to the Triton kernel and to the reference (one FMA per K tile, also
seen in fp32 outputs), partial row / column tiles, K not a multiple of 128, with and without
bias, bf16 / fp16, TMA-stored and register-stored outputs; and the autotuner lets it compete only after it agreed with Triton."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs an sm90 GPU (H100/H200)")


@pytest.fixture(autouse=True)
def kernels():
    from turbo_core import kernels
    from turbo_core.kernels import w8a8_gluon

    assert kernels.install()
    assert w8a8_gluon.usable(torch.device("cuda"))


# (65, 256, 100): rows of 200 bytes, not TMA-storable: the register-store epilogue
SHAPES = [(4000, 1536, 1536), (777, 320, 200), (1024, 8960, 1536), (300, 5120, 13824), (129, 144, 136), (65, 256, 100)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_every_gluon_config_equals_triton_and_reference(m, k, n):
    from turbo_core.kernels import w8a8_gluon, w8a8_triton
    from turbo_core.quant.int8 import quantize_int8, w8a8_linear_reference

    g = torch.Generator("cuda").manual_seed(m + k + n)
    for dtype, has_bias in [(torch.bfloat16, True), (torch.float16, False)]:
        x = (torch.randn(m, k, device="cuda", generator=g) * 2).to(dtype)
        qw, sw = quantize_int8(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5)
        b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype) if has_bias else None
        xq, xs = w8a8_triton.quantize_act(x)
        tri = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, b, dtype, config=w8a8_triton.GEMM_CONFIGS[0])
        ref = w8a8_linear_reference(x, qw, sw, b)
        assert torch.equal(tri, ref), (m, k, n, dtype)
        for cfg in w8a8_gluon.CONFIGS:
            y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, b, dtype, config=cfg)
            assert torch.equal(y, tri), (m, k, n, dtype, cfg)


@pytest.mark.parametrize("m,k,n", [(4000, 1536, 1536), (777, 320, 200), (300, 5120, 13824), (129, 8960, 1536)])
def test_residual_epilogue_equals_torch_gated_add(m, k, n):
    """residual + y * gate.to(dtype) from the epilogue (the residual tile TMA-loaded into the output
    tile's shared memory) == torch's CUDA ops on the GEMM's output, for every config, also into
    rows of a larger tensor; the Triton kernel the same."""
    from turbo_core.kernels import w8a8_gluon, w8a8_triton
    from turbo_core.quant.int8 import quantize_int8

    g = torch.Generator("cuda").manual_seed(m + n)
    for dtype, gated in [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)]:
        x = (torch.randn(m, k, device="cuda", generator=g) * 2).to(dtype)
        qw, sw = quantize_int8(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5)
        b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype)
        res = (torch.randn(m, n, device="cuda", generator=g) * 3).to(dtype)
        gate = torch.randn(1, 1, n, device="cuda", generator=g) if gated else None
        xq, xs = w8a8_triton.quantize_act(x)
        y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, b, dtype, config=w8a8_triton.GEMM_CONFIGS[0])
        expect = res + y * gate.to(dtype).reshape(n) if gated else res + y
        for cfg in [w8a8_triton.GEMM_CONFIGS[0], *w8a8_gluon.CONFIGS]:
            got = w8a8_triton.w8a8_gemm(xq, xs, qw, sw, b, dtype, config=cfg, residual=res, gate=gate)
            assert torch.equal(got, expect), (m, k, n, dtype, gated, cfg, int((got != expect).sum()))
        big = torch.full((m + 64, n), 7.0, device="cuda", dtype=dtype)
        w8a8_triton.w8a8_gemm(xq, xs, qw, sw, b, dtype, config=w8a8_gluon.CONFIGS[0], residual=res, gate=gate,
                              out=big[64:])
        assert torch.equal(big[64:], expect) and (big[:64] == 7).all()


def test_fp32_output_is_one_fma_per_k_tile():
    from turbo_core.kernels import w8a8_gluon, w8a8_triton
    from turbo_core.quant.int8 import quantize_int8, w8a8_linear_reference

    g = torch.Generator("cuda").manual_seed(7)
    m, k, n = 1000, 2048, 640
    x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-2, 1, k, device="cuda")[None, :]
    qw, sw = quantize_int8(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5)
    qx, sx = quantize_int8(x)
    ref = w8a8_linear_reference(x, qw, sw)  # fp32 x: the fp32 accumulator itself
    for cfg in [w8a8_triton.GEMM_CONFIGS[0], *w8a8_gluon.CONFIGS]:
        y = w8a8_triton.w8a8_gemm(qx, sx, qw, sw, None, torch.float32, config=cfg)
        assert torch.equal(y, ref), cfg


def test_autotuner_checks_gluon_then_lets_it_compete(monkeypatch):
    from turbo_core.kernels import w8a8_gluon, w8a8_triton
    from turbo_core.quant.int8 import quantize_int8

    monkeypatch.setattr(w8a8_triton, "_tuned", {})
    monkeypatch.setattr(w8a8_triton, "TUNE_TIMES", {})
    monkeypatch.setattr(w8a8_triton, "_gluon_state", {})
    g = torch.Generator("cuda").manual_seed(3)
    x = torch.randn(8192, 1536, device="cuda", generator=g).bfloat16()
    qw, sw = quantize_int8(torch.randn(1536, 1536, device="cuda", generator=g) / 40)
    xq, xs = w8a8_triton.quantize_act(x)
    y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw)
    (times,) = w8a8_triton.TUNE_TIMES.values()
    assert sum(bool(c.get("GLUON")) for c, _ in times) == len(w8a8_gluon.CONFIGS)
    assert torch.equal(y, w8a8_triton.w8a8_gemm(xq, xs, qw, sw, config=w8a8_triton.GEMM_CONFIGS[0]))
    assert not w8a8_triton._gluon_state


def test_gluon_that_disagrees_is_dropped(monkeypatch, caplog):
    from turbo_core.kernels import w8a8_gluon, w8a8_triton
    from turbo_core.quant.int8 import quantize_int8

    monkeypatch.setattr(w8a8_triton, "_tuned", {})
    monkeypatch.setattr(w8a8_triton, "TUNE_TIMES", {})
    monkeypatch.setattr(w8a8_triton, "_gluon_state", {})
    real = w8a8_gluon.gemm_into

    def off_by_one_ulp(y, *args):  # a Gluon build whose arithmetic drifted
        real(y, *args)
        y.view(torch.int16).add_(1)

    monkeypatch.setattr(w8a8_gluon, "gemm_into", off_by_one_ulp)
    g = torch.Generator("cuda").manual_seed(4)
    x = torch.randn(4096, 1536, device="cuda", generator=g).bfloat16()
    qw, sw = quantize_int8(torch.randn(1536, 1536, device="cuda", generator=g) / 40)
    xq, xs = w8a8_triton.quantize_act(x)
    with caplog.at_level("WARNING", logger="turbo_core"):
        y = w8a8_triton.w8a8_gemm(xq, xs, qw, sw)
    assert "Gluon GEMM is not used" in caplog.text and "outputs differ" in caplog.text
    (times,) = w8a8_triton.TUNE_TIMES.values()
    assert not any(c.get("GLUON") for c, _ in times)
    assert torch.equal(y, w8a8_triton.w8a8_gemm(xq, xs, qw, sw, config=w8a8_triton.GEMM_CONFIGS[0]))
