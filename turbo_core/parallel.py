"""Sequence parallelism (Ulysses) for the DiT, over torch.distributed.

Every rank holds the full weights and 1/N of the video tokens. Around self-attention
an all-to-all trades the token split for a head split, so each rank runs the
attention backend (dense, SLA, SageSLA) over the FULL sequence for H/N heads; the
norms, RoPE, cross-attention and FFN run on the local tokens. The head's output is
gathered once per forward, so every rank holds the same velocity and runs the
sampler's arithmetic identically.

    x [B, L/N, H, D] --all-to-all--> [B, L, H/N, D] --attention--> --all-to-all--> [B, L/N, H, D]

L need not divide by N: the tokens are zero-padded to a multiple of N, and the
padding is cut off after the all-to-all, where each rank has the whole sequence,
so attention and SLA's block selection see exactly the real tokens.

Launchers: `torchrun --nproc-per-node N -m turbo_core t2v ...` (init_from_env), and the
persistent worker processes of turbo_core.workers (the ComfyUI Multi-GPU node).
NCCL on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this fails (a stuck or lost rank)


class ParallelError(RuntimeError):
    """A collective failed: another rank died or stopped answering."""


def default_timeout() -> float:
    """Seconds a collective may wait for the other ranks (TURBO_PARALLEL_TIMEOUT overrides)."""
    return float(os.environ.get("TURBO_PARALLEL_TIMEOUT", DEFAULT_TIMEOUT_S))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class SequenceParallel:
    """This process's place in a sequence-parallel group; WanDiT.forward consults it
    (model.parallel = sp) and turbo_core.pipeline.sample_latent(parallel=sp) sets that."""

    def __init__(self, group=None, device=None):
        if not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs torch.distributed.init_process_group first "
                               "(see turbo_core.parallel.init_from_env)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
                else torch.device("cpu")
        self.device = torch.device(device)

    @property
    def is_lead(self) -> bool:
        """Rank 0: encodes the prompt, decodes and writes the video; the others only sample."""
        return self.rank == 0

    def __repr__(self):
        return f"SequenceParallel(rank {self.rank} of {self.world_size}, {self.device})"

    def check_heads(self, heads: int, what: str = "this model") -> None:
        if heads % self.world_size:
            ok = ", ".join(map(str, divisors(heads)))
            raise ValueError(f"{what} has {heads} attention heads, which cannot be split over {self.world_size} "
                             f"processes/GPUs: use a number that divides {heads} ({ok})")

    def shard(self, length: int) -> "TokenShard":
        """The split of one forward's `length` tokens over the group."""
        n = self.world_size
        return TokenShard(self, length, -(-length // n) * n)

    # -- collectives (every rank calls them in the same order)

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except (RuntimeError, dist.DistError) as err:
            raise ParallelError(f"rank {self.rank} of {self.world_size}: {what} with the other ranks failed "
                                f"(another rank died, ran out of memory or stopped answering): {err}") from err

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...]: x[j] goes to rank j; returns [N, ...] whose [j] came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._run("all-to-all", dist.all_to_all_single, out, x)
        return out

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._run("all-gather", dist.all_gather, parts, x.contiguous())
        return parts

    def broadcast(self, tensor: torch.Tensor | None, src: int = 0) -> torch.Tensor | None:
        """Rank `src`'s tensor (or None) on every rank, on this rank's device. Others may pass None."""
        meta = [None if tensor is None else (tuple(tensor.shape), tensor.dtype)] if self.rank == src else [None]
        self._run("broadcast", dist.broadcast_object_list, meta, src=src, device=self._object_device())
        if meta[0] is None:
            return None
        shape, dtype = meta[0]
        buf = tensor.to(self.device).contiguous() if self.rank == src else \
            torch.empty(shape, dtype=dtype, device=self.device)
        self._run("broadcast", dist.broadcast, buf, src=src)
        return buf

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. a cancel seen by one worker)."""
        t = torch.tensor([int(bool(flag))], device=self.device)
        self._run("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None


@dataclass(frozen=True)
class TokenShard:
    """One forward's `length` tokens, zero-padded to `padded` and split into N equal chunks."""

    sp: SequenceParallel
    length: int
    padded: int

    @property
    def chunk(self) -> int:
        return self.padded // self.sp.world_size

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of x along `dim` (which holds the `length` tokens)."""
        if self.padded > self.length:
            pad = list(x.shape)
            pad[dim] = self.padded - self.length
            x = torch.cat([x, x.new_zeros(pad)], dim)
        return x.narrow(dim, self.sp.rank * self.chunk, self.chunk)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's chunk joined along `dim`, padding dropped: the full sequence on every rank."""
        return torch.cat(self.sp.all_gather(x), dim).narrow(dim, 0, self.length)

    @torch.compiler.disable  # collectives run eagerly, like the attention kernels
    def attention(self, fn, q, k, v, *args, **kwargs) -> torch.Tensor:
        """fn(q, k, v, ...) over the full sequence, per head group. q, k, v, result [B, L/N, H, D]."""
        n = self.sp.world_size
        b, lc, h, d = q.shape
        hn = h // n
        # [N, 3, B, L/N, H/N, D]: entry j holds rank j's heads -> after the exchange, rank j's tokens
        qkv = torch.stack([q, k, v]).view(3, b, lc, n, hn, d).permute(3, 0, 1, 2, 4, 5)
        qkv = self.sp.all_to_all(qkv).permute(1, 2, 0, 3, 4, 5).reshape(3, b, n * lc, hn, d)
        q, k, v = (t[:, :self.length].contiguous() for t in qkv)  # [B, L, H/N, D]: padding cut off
        out = fn(q, k, v, *args, **kwargs)
        if self.padded > self.length:
            out = torch.cat([out, out.new_zeros(b, self.padded - self.length, hn, d)], 1)
        # [N, B, L/N, H/N, D]: entry j holds rank j's tokens -> after the exchange, rank j's heads
        out = self.sp.all_to_all(out.reshape(b, n, lc, hn, d).transpose(0, 1))
        return out.permute(1, 2, 0, 3, 4).reshape(b, lc, h, d)


# ---------------------------------------------------------------------------
# process groups

def init_group(*, rank: int, world_size: int, device, init_method: str | None = None,
               timeout: float | None = None) -> SequenceParallel:
    """Join (or create) the default process group: NCCL for CUDA devices, gloo for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            raise ValueError("a CUDA device for sequence parallelism needs an index (cuda:0, cuda:1, ...)")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{device} does not exist: this machine has {torch.cuda.device_count()} visible GPU(s)")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout or default_timeout()))
    return SequenceParallel(device=device)


def init_from_env(*, timeout: float | None = None) -> SequenceParallel | None:
    """The group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or None when not launched by it
    (or with one process). GPU = LOCAL_RANK with NCCL when CUDA is available, else the CPU with gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(f"{world} processes on this machine but only {torch.cuda.device_count()} GPU(s) are "
                             f"visible: use --nproc-per-node {torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return init_group(rank=rank, world_size=world, device=device, init_method="env://", timeout=timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
