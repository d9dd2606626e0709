"""Sparse-Linear Attention (SLA), plain PyTorch: the CPU path and the test oracle.

Per batch and head, with q, k, v [L, D] (spec 3.2):
  (a) block map: mean-pool q over BLKQ rows and (k - mean_L k) over BLKK rows, raw
      dot product, keep floor(topk * n_kblocks) key blocks for every query block;
  (b) sparse branch: softmax(q k^T / sqrt(D)) v over the kept key blocks only;
  (c) linear branch over ALL tokens with phi = softmax over the head dim:
      phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k)), then proj_l;
  out = sparse + proj_l(linear).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLKQ, BLKK = 128, 64  # the block sizes the released models run with


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B,H,L,D] -> [B,H,ceil(L/block),D]; a partial last block averages its real rows.

    Sums in fp32, result in x's dtype (like the reference kernel).
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    xs = F.pad(x.float(), (0, 0, 0, nb * block - n)).view(b, h, nb, block, d).sum(3)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = n - (nb - 1) * block
    return (xs / counts[:, None]).to(x.dtype)


def topk_count(n_kblocks: int, topk: float) -> int:
    """Key blocks kept per query block (at least one, so tiny inputs still attend)."""
    return max(1, min(n_kblocks, int(topk * n_kblocks)))


def block_map(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK):
    """q, k [B,H,L,D] -> (sparse_map int8 [B,H,Mq,Nk], lut int64 [B,H,Mq,kk])."""
    k_smooth = k - k.mean(dim=-2, keepdim=True)
    scores = mean_pool(q, blkq) @ mean_pool(k_smooth, blkk).transpose(-1, -2)  # [B,H,Mq,Nk]
    kk = topk_count(scores.shape[-1], topk)
    lut = torch.topk(scores, kk, dim=-1, sorted=False).indices
    sparse_map = torch.zeros_like(scores, dtype=torch.int8).scatter_(-1, lut, 1)
    return sparse_map, lut


def sparse_attention(q, k, v, lut, blkq: int = BLKQ, blkk: int = BLKK, chunk: int = 16):
    """Softmax attention of each query block over its selected key blocks.

    q, k, v [B,H,L,D]; lut [B,H,Mq,kk]. Works on `chunk` query blocks at a time
    so memory stays O(chunk * blkq * kk * blkk) whatever L is.
    """
    b, h, n, d = q.shape
    mq, kk = lut.shape[-2:]
    nk = -(-n // blkk)
    pad_k = nk * blkk - n
    kb = F.pad(k, (0, 0, 0, pad_k)).view(b, h, nk, blkk, d)
    vb = F.pad(v, (0, 0, 0, pad_k)).view(b, h, nk, blkk, d)
    key_valid = (torch.arange(nk * blkk, device=q.device) < n).view(nk, blkk)
    qb = F.pad(q, (0, 0, 0, mq * blkq - n)).view(b, h, mq, blkq, d)
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(b, h, mq, blkq, d, dtype=q.dtype, device=q.device)
    for i0 in range(0, mq, chunk):
        idx = lut[:, :, i0:i0 + chunk]  # [B,H,c,kk]
        c = idx.shape[2]
        flat = idx.reshape(b, h, c * kk, 1, 1).expand(-1, -1, -1, blkk, d)
        ks = torch.gather(kb, 2, flat).view(b, h, c, kk * blkk, d)
        vs = torch.gather(vb, 2, flat).view(b, h, c, kk * blkk, d)
        valid = key_valid[idx].view(b, h, c, 1, kk * blkk)
        s = (qb[:, :, i0:i0 + c].float() @ ks.float().transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
        # P is cast to the input dtype before P.V, like the kernel.
        out[:, :, i0:i0 + c] = (p.to(q.dtype).float() @ vs.float()).to(q.dtype)
    return out.view(b, h, mq * blkq, d)[:, :, :n]


def linear_attention(q, k, v):
    """Softmax-feature-map linear attention over all tokens, in q's dtype. [B,H,L,D]."""
    phi_q = torch.softmax(q, dim=-1)
    phi_k = torch.softmax(k, dim=-1)
    kv = phi_k.transpose(-1, -2) @ v  # [B,H,D,D]
    k_sum = phi_k.sum(dim=-2, keepdim=True)  # [B,H,1,D]
    return (phi_q @ kv) / (1e-5 + (phi_q * k_sum).sum(dim=-1, keepdim=True))


def sla_attention(q, k, v, proj_l_weight=None, proj_l_bias=None, *, topk: float = 0.1,
                  blkq: int = BLKQ, blkk: int = BLKK, compute_dtype=torch.bfloat16):
    """SLA on [B,L,H,D] tensors (the DiT's layout); returns [B,L,H,D] in q's dtype.

    Without proj_l (a checkpoint made for dense attention) the linear branch is
    dropped: proj_l is zero-initialised in training, so that is its neutral value.
    """
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    _, lut = block_map(q, k, topk, blkq, blkk)  # scored in the input dtype, as upstream
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    out = sparse_attention(q, k, v, lut, blkq, blkk)
    if proj_l_weight is not None:
        o_l = linear_attention(q, k, v)
        o_l = F.linear(o_l, proj_l_weight.to(compute_dtype),
                       None if proj_l_bias is None else proj_l_bias.to(compute_dtype))
        out = out + o_l
    return out.to(dtype).transpose(1, 2)
