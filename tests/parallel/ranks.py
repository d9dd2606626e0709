"""Code the spawned ranks of test_sequence_parallel.py run (importable by name in a child process)."""
import torch


def qkv(length: int, heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, heads, 128, generator=g) for _ in range(3))
    proj_l = (torch.randn(128, 128, generator=g) / 11, torch.randn(128, generator=g))
    return q, k, v, proj_l


def attention_rank(rank: int, world: int, store: str, out: str, length: int, heads: int) -> None:
    """Self-attention of a [2, length, heads, 128] input through TokenShard (all-to-all both ways)."""
    from turbo_core.attention import self_attention
    from turbo_core.parallel import init_group, shutdown

    torch.set_num_threads(1)
    sp = init_group(rank=rank, world_size=world, device="cpu", init_method=f"file://{store}", timeout=60)
    q, k, v, proj_l = qkv(length, heads)
    shard = sp.shard(length)
    results = {}
    for backend in ("original", "sla"):
        local = shard.attention(self_attention, shard.local(q, 1), shard.local(k, 1), shard.local(v, 1), backend,
                                proj_l=proj_l, topk=0.3)
        results[backend] = shard.gather(local, 1)
    if rank == 0:
        torch.save(results, out)
    shutdown()
