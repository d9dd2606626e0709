"""The FFN runs in passes of `ffn_chunk` tokens (memory bound at 14B-720p): same network."""
import pytest
import torch

from conftest import max_abs
from turbo_core.models import dit as dit_module
from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

# latent [1,16,3,16,24] -> 3 x 8 x 12 = 288 tokens: passes of 128, 128 and 32 with ffn_chunk=128
X_SHAPE = (1, 16, 3, 16, 24)


def _inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *X_SHAPE[1:], generator=g), torch.tensor([700.0] * batch),
            torch.randn(batch, 24, 64, generator=g))


def test_default_chunk_is_128_aligned_and_leaves_small_inputs_whole():
    assert dit_module.FFN_CHUNK % 128 == 0 and dit_module.FFN_CHUNK >= 8192
    model = dit_from_state_dict(tiny_dit_state_dict(seed=3), device="cpu", dtype="fp32")
    assert all(b.ffn_chunk == dit_module.FFN_CHUNK for b in model.blocks)
    # the models' videos (81 frames): 1.3B-480p in one pass, 14B-720p in two (RESULTS.md session 19)
    assert model.blocks[0]._ffn_passes(32760) == 1 and model.blocks[0]._ffn_passes(75600) == 2


@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_ffn_matches_one_pass_fp32(batch):
    model = dit_from_state_dict(tiny_dit_state_dict(seed=3), device="cpu", dtype="fp32")
    x, t, ctx = _inputs(1, batch)
    model.set_ffn_chunk(0)
    whole = model(x, t, ctx)
    model.set_ffn_chunk(128)
    chunked = model(x, t, ctx)
    assert max_abs(chunked, whole) <= 1e-5 * float(whole.abs().max())


def test_chunked_ffn_is_bit_exact_in_w8a8():
    # activation tiles are 128 rows: 128-aligned passes quantize exactly the same tiles
    sd = quantize_state_dict(tiny_dit_state_dict(seed=4))
    model = dit_from_state_dict(sd, device="cpu", dtype="bf16", linear="w8a8")
    x, t, ctx = _inputs(2)
    model.set_ffn_chunk(0)
    whole = model(x, t, ctx)
    model.set_ffn_chunk(128)
    assert torch.equal(model(x, t, ctx), whole)


@pytest.mark.parametrize("bad", [-128, 100, 129])
def test_bad_chunk_sizes_are_refused(bad):
    model = dit_from_state_dict(tiny_dit_state_dict(seed=3), device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="multiple of 128"):
        model.set_ffn_chunk(bad)
