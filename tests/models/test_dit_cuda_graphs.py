"""`set_cuda_graphs` is a CUDA-only switch: on a CPU model the steps run eagerly and nothing is
captured (tests/gpu/test_cuda_graphs_gpu.py checks the replay on a GPU)."""
import torch

from turbo_core.models.dit_loader import dit_from_state_dict
from turbo_core.tiny import tiny_dit_state_dict


def test_graphs_on_a_cpu_model_change_nothing():
    model = dit_from_state_dict(tiny_dit_state_dict(seed=2), device="cpu", dtype="bf16")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 2, 8, 12, generator=g), torch.randn(1, 24, 64, generator=g), torch.tensor([500.0])
    eager = model(x, t, ctx, attention="sla")
    model.set_cuda_graphs(True)
    for _ in range(3):
        assert torch.equal(model(x, t, ctx, attention="sla"), eager)
    assert model._graph is None and model._graph_seen is None
    model.set_cuda_graphs(False)
    assert not model.cuda_graphs and torch.equal(model(x, t, ctx, attention="sla"), eager)
