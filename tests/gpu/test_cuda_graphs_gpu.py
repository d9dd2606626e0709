"""`WanDiT.set_cuda_graphs(True)` on a CUDA GPU: the first step with new shapes runs eagerly, the
second is captured, later ones replay; every output equals the eager model's bit for bit (the same
kernels), with the Triton attention and the W8A8 kernels, bf16 and int8."""
import pytest
import torch

from turbo_core import kernels
from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.tiny import quantize_state_dict, tiny_dit_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(seed, frames=2, h=32, w=48):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, frames, h, w, generator=g), torch.tensor([100.0 * seed + 50]),
            torch.randn(1, 24, 4096, generator=g))


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8-w8a8"])
def test_graph_replay_equals_eager(int8):
    assert kernels.install()
    sd = tiny_dit_state_dict(dim=256, layers=3, ffn_dim=640, text_dim=4096, seed=7)
    if int8:
        sd = quantize_state_dict(sd)
    kw = dict(device="cuda", dtype="bf16", linear="w8a8") if int8 else dict(device="cuda", dtype="bf16")
    eager = dit_from_state_dict(dict(sd), **kw)
    graphed = dit_from_state_dict(dict(sd), **kw)
    graphed.set_cuda_graphs(True)
    calls = []
    graphed.between_blocks = lambda: calls.append(1)
    for seed in (1, 2, 3, 4):  # eager, capture + replay, replay, replay
        x, t, ctx = _inputs(seed)  # CPU inputs, as a sampler may pass them
        calls.clear()
        out = graphed(x, t, ctx, attention="sagesla")
        assert torch.equal(out, eager(x.cuda(), t.cuda(), ctx.cuda(), attention="sagesla")), seed
        assert calls, "the host's interrupt check still runs every step"
    assert graphed._graph is not None
    first = graphed._graph[1]
    # new shapes: eager once, then captured again; the old graph is dropped
    for seed in (5, 6):
        x, t, ctx = _inputs(seed, frames=1)
        assert torch.equal(graphed(x, t, ctx, attention="sagesla"), eager(x, t, ctx, attention="sagesla"))
    assert graphed._graph[1] is not first
    # another attention backend is another graph; switching graphs off drops it
    x, t, ctx = _inputs(7, frames=1)
    for _ in range(3):
        assert torch.equal(graphed(x, t, ctx, attention="sla"), eager(x, t, ctx, attention="sla"))
    graphed.set_cuda_graphs(False)
    assert graphed._graph is None
    assert torch.equal(graphed(x, t, ctx, attention="sla"), eager(x, t, ctx, attention="sla"))


def test_a_step_that_cannot_be_captured_runs_eagerly(caplog):
    """A host callback that waits for the GPU cannot run inside a capture: graphs switch off with
    a warning, and the step (and the ones after it) still return the eager result."""
    import logging

    assert kernels.install()
    sd = tiny_dit_state_dict(dim=256, layers=2, ffn_dim=640, text_dim=4096, seed=8)
    eager = dit_from_state_dict(dict(sd), device="cuda", dtype="bf16")
    graphed = dit_from_state_dict(dict(sd), device="cuda", dtype="bf16")
    graphed.set_cuda_graphs(True)
    graphed.between_blocks = torch.cuda.synchronize
    with caplog.at_level(logging.WARNING, logger="turbo_core"):
        for seed in (1, 2, 3):
            x, t, ctx = _inputs(seed, frames=1)
            assert torch.equal(graphed(x, t, ctx, attention="sagesla"), eager(x, t, ctx, attention="sagesla"))
    assert not graphed.cuda_graphs and graphed._graph is None
    assert any("could not be captured" in r.getMessage() for r in caplog.records)
    torch.randn(4, device="cuda")  # the CUDA RNG is usable again
