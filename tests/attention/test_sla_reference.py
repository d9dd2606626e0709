"""The PyTorch SLA reference against the official op (fixture sla_op).

Tolerance (fixtures README): sparse_map exact; out max_abs <= 2e-2, rel_l2 <= 5e-3.
"""
import math

import pytest
import torch

from conftest import load_fixture, max_abs, rel_l2
from turbo_core.attention import self_attention
from turbo_core.attention.sla_reference import block_map, linear_attention, mean_pool, sla_attention, \
    sparse_attention, topk_count


def test_sla_op_parity():
    fix = load_fixture("sla_op.safetensors")
    q, k, v = fix["in.q"], fix["in.k"], fix["in.v"]
    smap, lut = block_map(q.transpose(1, 2), k.transpose(1, 2), 0.5)
    assert torch.equal(smap, fix["sparse_map"])
    o_s = sparse_attention(*(t.transpose(1, 2) for t in (q, k, v)), lut)
    assert rel_l2(o_s, fix["o_s"]) <= 5e-3
    out = sla_attention(q, k, v, fix["proj_l.weight"], fix["proj_l.bias"], topk=0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_abs(out, fix["out"]) <= 2e-2
    assert rel_l2(out, fix["out"]) <= 5e-3


def test_mean_pool_partial_block_averages_real_rows():
    x = torch.randn(1, 1, 200, 8)
    pooled = mean_pool(x, 128)
    assert torch.allclose(pooled[0, 0, 1], x[0, 0, 128:].mean(0), atol=1e-6)


@pytest.mark.parametrize("n", [100, 333])
def test_sparse_branch_equals_masked_dense_attention(n):
    q, k, v = (torch.randn(1, 2, n, 128) for _ in range(3))
    _, lut = block_map(q, k, 0.5, 32, 16)
    got = sparse_attention(q, k, v, lut, 32, 16, chunk=3)
    # dense attention where only the selected key blocks are allowed
    allowed = torch.zeros(1, 2, n, n, dtype=torch.bool)
    for qi in range(lut.shape[2]):
        for kb in lut[0, 0, qi]:
            allowed[:, 0, qi * 32:(qi + 1) * 32, kb * 16:(kb + 1) * 16] = True
        for kb in lut[0, 1, qi]:
            allowed[:, 1, qi * 32:(qi + 1) * 32, kb * 16:(kb + 1) * 16] = True
    s = (q @ k.transpose(-1, -2)) / math.sqrt(128)
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    assert max_abs(got, ref) < 1e-5


def test_linear_branch_formula():
    q, k, v = (torch.randn(1, 1, 50, 16, dtype=torch.float64) for _ in range(3))
    pq, pk = torch.softmax(q, -1), torch.softmax(k, -1)
    ref = torch.stack([(pq[0, 0, i] @ (pk[0, 0].T @ v[0, 0])) / (1e-5 + pq[0, 0, i] @ pk[0, 0].sum(0))
                       for i in range(50)])
    assert max_abs(linear_attention(q, k, v)[0, 0], ref) < 1e-12


def test_topk_count_matches_release_numbers():
    assert topk_count(512, 0.1) == 51  # 1.3B-480p
    assert topk_count(1182, 0.1) == 118  # 14B-720p
    assert topk_count(3, 0.1) == 1  # never zero blocks


def test_dispatch_names():
    q, k, v = (torch.randn(1, 64, 2, 128) for _ in range(3))
    dense = self_attention(q, k, v, "original")
    ref = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(128), -1) \
        @ v.transpose(1, 2)
    assert max_abs(dense, ref.transpose(1, 2)) < 1e-5
    for name in ("sla", "sagesla", "auto"):
        assert self_attention(q, k, v, name, topk=0.5).shape == q.shape
    with pytest.raises(ValueError, match="original, sla, sagesla, auto"):
        self_attention(q, k, v, "flash")


def test_auto_is_sla_off_the_gpu():
    # on CUDA auto picks sagesla from sm89 on (checked by bench/bench_dit.py on the H100)
    from turbo_core.attention import resolve

    assert resolve("auto", torch.device("cpu")) == "sla"
    assert resolve("sagesla", torch.device("cpu")) == "sagesla"
    q, k, v = (torch.randn(1, 200, 2, 128) for _ in range(3))
    assert torch.equal(self_attention(q, k, v, "auto", topk=0.3), self_attention(q, k, v, "sla", topk=0.3))
