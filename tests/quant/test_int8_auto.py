"""linear="auto" for int8 checkpoints: dequant on the CPU, the faster way per GPU on CUDA
(the CUDA timing path runs in tests/gpu/test_int8_auto_gpu.py on a GPU machine)."""
import pytest
import torch

from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.quant.int8 import Int8Linear, choose_mode
from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 6, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 24, 64, generator=g)


def test_auto_is_dequant_on_the_cpu():
    sd = quantize_state_dict(tiny_dit_state_dict(seed=2))
    auto = dit_from_state_dict(dict(sd), device="cpu", dtype="bf16", linear="auto")
    plain = dit_from_state_dict(dict(sd), device="cpu", dtype="bf16", linear="dequant")
    layers = [m for m in auto.modules() if isinstance(m, Int8Linear)]
    assert layers and auto.int8_auto and not plain.int8_auto
    x, t, ctx = _inputs()
    assert torch.equal(auto(x, t, ctx), plain(x, t, ctx))
    assert {m.mode for m in layers} == {"dequant"}
    assert choose_mode(layers, lambda: None, 4096, torch.bfloat16, torch.device("cpu")) == "dequant"


def test_linear_mode_switches_and_validation():
    model = dit_from_state_dict(quantize_state_dict(tiny_dit_state_dict(seed=2)), device="cpu", dtype="fp32")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert model.int8_auto  # the loader's default is auto
    model.set_linear_mode("w8a8")
    assert not model.int8_auto and {m.mode for m in layers} == {"w8a8"}
    model.set_linear_mode("auto")
    assert model.int8_auto and {m.mode for m in layers} == {"dequant"}
    with pytest.raises(ValueError, match="linear must be auto, w8a8 or dequant"):
        model.set_linear_mode("int4")
    with pytest.raises(ValueError, match="linear must be auto, w8a8 or dequant"):
        dit_from_state_dict(tiny_dit_state_dict(seed=2), device="cpu", linear="fast")
    bf16_model = dit_from_state_dict(tiny_dit_state_dict(seed=2), device="cpu", dtype="fp32")
    assert not bf16_model.int8_auto  # nothing to choose without int8 layers
