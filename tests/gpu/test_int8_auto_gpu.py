"""linear="auto" on a CUDA GPU: both int8 ways are timed once per GPU and size, the faster kept,
and a W8A8 kernel that fails is never used. Needs a GPU (run on the lent H100: see bench/RESULTS.md);
the CPU suite covers the CPU side in tests/quant/test_int8_auto.py."""
import logging

import pytest
import torch

from conftest import rel_l2
from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.quant import int8 as int8_module
from turbo_core.quant.int8 import Int8Linear
from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(dev, frames=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, frames, 32, 48, generator=g).to(dev), torch.tensor([500.0], device=dev),
            torch.randn(1, 24, 4096, generator=g).to(dev))


def test_auto_times_once_and_matches_dequant(caplog, monkeypatch):
    monkeypatch.setattr(int8_module, "_choices", {})
    sd = quantize_state_dict(tiny_dit_state_dict(dim=1536, layers=30, ffn_dim=8960, text_dim=4096, seed=3))
    auto = dit_from_state_dict(dict(sd), device="cuda", dtype="bf16", linear="auto")
    x, t, ctx = _inputs("cuda")
    with caplog.at_level(logging.INFO, logger="turbo_core"):
        out = auto(x, t, ctx, attention="sla")
        out2 = auto(x, t, ctx, attention="sla")
    said = [r.getMessage() for r in caplog.records if "int8 linears on" in r.getMessage()]
    assert len(said) == 1, said  # timed once per GPU and size
    modes = {m.mode for m in auto.modules() if isinstance(m, Int8Linear)}
    assert len(modes) == 1 and modes <= {"w8a8", "dequant"}
    assert auto.int8_auto and said[0].split("tokens: ")[1].startswith("W8A8 kernel (") == (modes == {"w8a8"})
    assert torch.equal(out, out2)
    # the timing (block 0 run in both modes on the real hidden state) left nothing behind
    fixed = dit_from_state_dict(dict(sd), device="cuda", dtype="bf16", linear=next(iter(modes)))
    assert torch.equal(fixed(x, t, ctx, attention="sla"), out)
    auto.set_linear_mode("dequant")
    ref = auto(x, t, ctx, attention="sla")
    assert rel_l2(out, ref) <= (0 if modes == {"dequant"} else 5e-2), said  # W8A8 vs dequant: int8 activations


class _BrokenKernel:
    """A W8A8 kernel that cannot run on this GPU (as an unsupported architecture would)."""

    def supports(self, x):
        return True

    def __call__(self, *args):
        raise RuntimeError("no int8 MMA on this GPU")

    # the halves a block calls: q/k/v sharing one quantisation, a norm quantised as it is made
    quantize = gemm = quantize_norm = __call__


def test_a_failing_kernel_is_never_used(caplog, monkeypatch):
    monkeypatch.setattr(int8_module, "_choices", {})
    sd = quantize_state_dict(tiny_dit_state_dict(seed=4, text_dim=4096))
    model = dit_from_state_dict(sd, device="cuda", dtype="bf16", linear="auto")
    x, t, ctx = _inputs("cuda", frames=1)
    from turbo_core import kernels
    kernels.install()
    monkeypatch.setattr(Int8Linear, "kernel", _BrokenKernel())
    with caplog.at_level(logging.INFO, logger="turbo_core"):
        model(x, t, ctx)
    assert {m.mode for m in model.modules() if isinstance(m, Int8Linear)} == {"dequant"}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "W8A8 kernel failed" in r.getMessage()]
    assert warned and "no int8 MMA on this GPU" in warned[0].getMessage()


def test_no_memory_to_time_means_dequant(caplog, monkeypatch):
    from turbo_core import kernels
    from turbo_core.quant.int8 import choose_mode, quantize_int8

    assert kernels.install()
    monkeypatch.setattr(int8_module, "_choices", {})
    layer = Int8Linear(8960, 1536, device="cuda")
    qw, sw = quantize_int8(torch.randn(1536, 8960, device="cuda") / 100)
    layer.int8_weight.copy_(qw)
    layer.scale.copy_(sw)
    layer.bias.data.zero_()
    layer.mode = "w8a8"
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # room for ~64 MiB more: the timing input alone (16384 x 8960 bf16) is 280 MiB
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (64 << 20)) / total)
    try:
        with caplog.at_level(logging.INFO, logger="turbo_core"):
            mode = choose_mode([layer], lambda: layer(torch.randn(16384, 8960, device="cuda", dtype=torch.bfloat16)),
                               16384, torch.bfloat16, torch.device("cuda"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert mode == "dequant"
    assert any(r.levelno == logging.WARNING and "not enough free GPU memory" in r.getMessage() for r in caplog.records)
