"""The DiT block's row-wise glue in one Triton kernel: gated residual add, LayerNorm, AdaLN.

Between its matmuls a Wan block does, per token row of width D (see `models.dit.Block`):

    h  = (shift_sa + LN(x) * (1 + scale_sa)).to(dtype)   # norm1 + modulation -> q/k/v
    x  = x + attn * gate_sa.to(dtype)                     # gated residual (dtype math)
    n  = LN_affine(x.float()).to(dtype)                   # norm3 -> cross-attention
    x  = x + cross
    h  = (shift_ff + LN(x) * (1 + scale_ff)).to(dtype)   # norm2 + modulation -> FFN
    x  = x + ffn(h) * gate_ff.to(dtype)

In PyTorch each line is 2-4 kernels with fp32 temporaries of the whole [L, D]
(at 14B-720p 1.5 GiB each). Here each line, or an add followed by its norm, is
one pass: the inputs are read once, the sum and the normed row written once.

`add_norm(x, y, gate, eps, ...)`, `norm(x, eps, ...)` and `gated_add(x, y, gate, out=None)`
keep the torch path's rounding points (where the W8A8 GEMM adds the residual in its
epilogue, the same rounding, the block runs `norm` alone):
  * y * gate and x + (y * gate) are each rounded to x's dtype (bf16 math in
    torch); the gate is first rounded to x's dtype (`gate.to(x.dtype)`);
  * LayerNorm statistics are fp32 (two-pass mean / variance), the plain norm is
    rounded to x's dtype before the modulation (norm1/norm2 return x's dtype),
    the modulation is fp32 (1 + scale computed in fp32), then rounded;
  * the affine norm (norm3) is fp32 throughout and rounded once.
The residual sums are therefore bit-identical to torch; the norms can differ by
one ulp on a few elements (another fp32 summation order).

`norm_stats(x, eps)` writes only each row's (mean, rstd): where every reader of a norm
runs the W8A8 kernel, `w8a8_triton.quantize_norm` makes the int8 codes from x and
these, so the normed tensor is never written and read back.

Layout: one program per token row (32 in the interpreter), the row held as one
[next_pow2(D)] tile, or read in chunks of 1024 (three passes) when D > 8192. Rows
are addressed through batch and token strides (the FFN's chunked residual writes
into a slice of its output); the last dim must have unit stride. Offsets are
int64. shift / scale / gate are [B, 1, D] fp32 views (chunks of the modulation)
read through their batch stride, so they are never copied.

Strides are specialised (16-byte divisible ones let loads and stores be 16-byte vectors: 1.15-1.4x
faster than one bf16 at a time, session 17); only the row counts are not.

Interpreter (TRITON_INTERPRET=1, the CPU tests): casts to bf16 go through
`sla_triton._cast` (round to nearest even; the interpreter's own cast truncates).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sla_triton import INTERPRET, _cast

NORM_NONE, NORM_PLAIN, NORM_AFFINE, NORM_MODULATE = 0, 1, 2, 3
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _row_sum(X, Y, G, O, b, l, cols, mask, sxb, sxl, syb, syl, sob, sol, sgb, dt: tl.constexpr,
             ADD: tl.constexpr, GATE: tl.constexpr, WRITE_SUM: tl.constexpr, INTERPRET: tl.constexpr):
    """x (+ y * gate) of rows b * L + l, columns cols, as fp32 (0 where masked): y * gate and the
    sum each rounded to dt, the gate first rounded to dt, as torch's ops in dt; the sum written
    to O when WRITE_SUM (exact: it is already rounded)."""
    x = tl.load(X + b * sxb + l * sxl + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        y = tl.load(Y + b * syb + l * syl + cols, mask=mask, other=0.0).to(tl.float32)
        if GATE:  # gate.to(dtype), then y * gate rounded to dtype
            g = _cast(tl.load(G + b * sgb + cols, mask=mask, other=0.0), dt, INTERPRET).to(tl.float32)
            y = _cast(y * g, dt, INTERPRET).to(tl.float32)
        x = _cast(x + y, dt, INTERPRET).to(tl.float32)
        if WRITE_SUM:
            tl.store(O + b * sob + l * sol + cols, x.to(dt), mask=mask)
    return x


@triton.jit
def _norm_out(z, W, BI, SH, SC, b, cols, mask, ssb, stb, dt: tl.constexpr, NORM: tl.constexpr,
              INTERPRET: tl.constexpr):
    """The normed values z = (x - mean) * rstd -> the norm's output in dt: affine in fp32 (NORM 2),
    or rounded to dt (the norm returns dtype) then AdaLN-modulated in fp32 (NORM 3)."""
    if NORM == 2:
        w = tl.load(W + cols, mask=mask, other=0.0)
        bias = tl.load(BI + cols, mask=mask, other=0.0)
        z = z * w + bias
    if NORM == 3:
        z = _cast(z, dt, INTERPRET).to(tl.float32)
        sh = tl.load(SH + b * ssb + cols, mask=mask, other=0.0)
        sc = tl.load(SC + b * stb + cols, mask=mask, other=0.0)
        z = sh + z * (1.0 + sc)
    return _cast(z, dt, INTERPRET)


@triton.jit(do_not_specialize=["M", "L"])
def _residual_norm_kernel(X, Y, G, O, NRM, W, BI, SH, SC, M, L, D,
                          sxb, sxl, syb, syl, sob, sol, sgb, ssb, stb, eps,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ADD: tl.constexpr, GATE: tl.constexpr,
                          WRITE_SUM: tl.constexpr, NORM: tl.constexpr, STATS: tl.constexpr,
                          INTERPRET: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # token rows b * L + l
    b = (r // L)[:, None]
    l = (r % L)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (r < M)[:, None] & (cols < D)
    dt = O.dtype.element_ty
    x = _row_sum(X, Y, G, O, b, l, cols, mask, sxb, sxl, syb, syl, sob, sol, sgb, dt, ADD, GATE, WRITE_SUM, INTERPRET)
    if NORM != 0:
        mean = tl.sum(x, 1)[:, None] / D
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, 1)[:, None] / D
        # correctly rounded sqrt and divide, as torch's CPU path (once per row: free)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        if STATS:  # (mean, rstd) per row into NRM [M, 2] fp32: w8a8_triton.quantize_norm normalises
            two = tl.arange(0, 2)[None, :]
            tl.store(NRM + r[:, None] * 2 + two, tl.where(two == 0, mean, rstd), mask=(r < M)[:, None])
        else:
            tl.store(NRM + r[:, None] * D + cols,
                     _norm_out(xc * rstd, W, BI, SH, SC, b, cols, mask, ssb, stb, dt, NORM, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["M", "L"])
def _residual_norm_chunked_kernel(X, Y, G, O, NRM, W, BI, SH, SC, M, L, D,
                                  sxb, sxl, syb, syl, sob, sol, sgb, ssb, stb, eps,
                                  CHUNK: tl.constexpr, ADD: tl.constexpr, GATE: tl.constexpr,
                                  WRITE_SUM: tl.constexpr, NORM: tl.constexpr, STATS: tl.constexpr,
                                  INTERPRET: tl.constexpr):
    """`_residual_norm_kernel`'s math for one row, in chunks of CHUNK columns: pass 1 makes (and
    writes) the sum and its total, pass 2 the centred squares, pass 3 the normed row, each pass
    reading the row again (the sum from O where it was written; L1/L2 hits). For rows wider than
    8192 (past that a whole row on 8 warps holds > 32 fp32 per thread per tensor); chunks hold a
    few registers and waste no lanes."""
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    l = r % L
    dt = O.dtype.element_ty
    offs = tl.arange(0, CHUNK)
    part = tl.zeros([CHUNK], tl.float32)
    for c0 in range(0, D, CHUNK):
        cols = c0 + offs
        x = _row_sum(X, Y, G, O, b, l, cols, cols < D, sxb, sxl, syb, syl, sob, sol, sgb, dt,
                     ADD, GATE, WRITE_SUM, INTERPRET)
        part += x
    if NORM != 0:
        mean = tl.sum(part, 0) / D
        # the row again: the sum as written (exact; every add here writes its sum), or x
        if ADD:
            RX, rxb, rxl = O, sob, sol
        else:
            RX, rxb, rxl = X, sxb, sxl
        part = tl.zeros([CHUNK], tl.float32)
        for c0 in range(0, D, CHUNK):
            cols = c0 + offs
            x = _row_sum(RX, Y, G, O, b, l, cols, cols < D, rxb, rxl, syb, syl, sob, sol, sgb, dt,
                         False, GATE, False, INTERPRET)
            xc = tl.where(cols < D, x - mean, 0.0)
            part += xc * xc
        var = tl.sum(part, 0) / D
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        if STATS:  # as in _residual_norm_kernel
            tl.store(NRM + r * 2, mean)
            tl.store(NRM + r * 2 + 1, rstd)
        else:
            for c0 in range(0, D, CHUNK):
                cols = c0 + offs
                mask = cols < D
                x = _row_sum(RX, Y, G, O, b, l, cols, mask, rxb, rxl, syb, syl, sob, sol, sgb, dt,
                             False, GATE, False, INTERPRET)
                z = (x - mean) * rstd
                tl.store(NRM + r * D + cols,
                         _norm_out(z, W, BI, SH, SC, b, cols, mask, ssb, stb, dt, NORM, INTERPRET), mask=mask)


def supports(x: torch.Tensor) -> bool:
    """True when the kernels can take x [B, L, D]: a CUDA tensor (or the interpreter) in bf16/fp16/fp32."""
    return (x.is_cuda or INTERPRET) and x.dim() == 3 and x.dtype in _DTYPES and x.shape[-1] <= 16384


def _launch_shape(d: int) -> tuple[int, int, int]:
    """(rows per program, warps, chunk: 0 = the whole row as one tile). H100, bf16, us for
    stats / norm1+AdaLN / add+norm3 / add+norm2+AdaLN / gated add at 1.3B-480p (D=1536) and
    14B-720p (D=5120) [a copy of x: 72 / 516 us] (session 17, loads in 16-byte vectors):
      whole row, 1 row, 4 warps     47  76 141 139 105  |  -    -    -    -    -
      whole row, 1 row, 8 warps     67  93 139 140 105  | 299  667 1028 1028  768
      whole row, 1 row, 16 warps     -   -   -   -   -  | 375  807 1353 1112  756
      chunks of 512, 4 warps        59  95 141 143 106  | 317  823 1264 1279  779
      chunks of 1024, 4 warps        -   -   -   -   -  | 305  873 1276 1288  779
      chunks of 1024 / 2048, 8 warps                    | 374-393 612-616 1043-1049 1045-1050 769-770
    (2 or 4 rows per program: no faster at 1.3B.) Until session 17 the strides were not
    specialised, so every bf16 was loaded alone; chunks of 1024 then won past D = 2048 (session 8).
    The chunked kernel stays for rows past 8192. The interpreter pays per program: many rows each."""
    if INTERPRET:
        return 32, 1, 0
    if d > 8192:
        return 1, 4, 1024
    return (1, 4, 0) if d <= 2048 else (1, 8, 0)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _vec(t: torch.Tensor | None, b: int, d: int, name: str, device) -> torch.Tensor | None:
    """A [B or 1, 1, D] (or [1, D], [D]) per-batch vector as fp32 read through its batch stride."""
    if t is None:
        return None
    t = t.to(device=device, dtype=torch.float32)
    if t.dim() < 3 and t.shape[:-2] == ():
        t = t.reshape(1, 1, -1) if t.dim() == 1 or t.shape[0] == 1 else t
    if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != d or t.shape[0] not in (1, b):
        raise ValueError(f"{name} must be [B, 1, {d}] with B in (1, {b}), got {tuple(t.shape)}")
    t = t.expand(b, 1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, y, gate, out, norm, weight, bias, shift, scale, eps, stats=False):
    if not supports(x):
        raise ValueError(f"residual_norm: x must be [B, L, D] bf16/fp16/fp32 on CUDA, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    b, n, d = x.shape
    x = _row_view(x)
    if y is not None:
        if out is None:  # the chunked kernel reads the written sum back
            raise ValueError("residual_norm: an add needs its output tensor")
        if y.shape != x.shape:
            raise ValueError(f"residual_norm: y {tuple(y.shape)} must match x {tuple(x.shape)}")
        y = _row_view(y)
    gate = _vec(gate, b, d, "gate", x.device)
    shift = _vec(shift, b, d, "shift", x.device)
    scale = _vec(scale, b, d, "scale", x.device)
    if norm == NORM_AFFINE:
        weight = weight.to(device=x.device, dtype=torch.float32).contiguous()
        bias = bias.to(device=x.device, dtype=torch.float32).contiguous()
        if weight.shape != (d,) or bias.shape != (d,):
            raise ValueError(f"residual_norm: weight and bias must be [{d}]")
    if stats:
        nrm = torch.empty(b, n, 2, dtype=torch.float32, device=x.device)
    else:
        nrm = torch.empty(b, n, d, dtype=x.dtype, device=x.device) if norm != NORM_NONE else None
    if b * n == 0:
        return out, nrm
    dummy = x
    rows, warps, chunk = _launch_shape(d)
    args = (x, dummy if y is None else y, dummy if gate is None else gate, dummy if out is None else out,
            dummy if nrm is None else nrm, dummy if weight is None else weight, dummy if bias is None else bias,
            dummy if shift is None else shift, dummy if scale is None else scale, b * n, n, d,
            x.stride(0), x.stride(1), *(y.stride()[:2] if y is not None else (0, 0)),
            *(out.stride()[:2] if out is not None else (0, 0)),
            gate.stride(0) if gate is not None else 0, shift.stride(0) if shift is not None else 0,
            scale.stride(0) if scale is not None else 0, float(eps))
    flags = dict(ADD=y is not None, GATE=gate is not None, WRITE_SUM=out is not None, NORM=norm, STATS=stats,
                 INTERPRET=INTERPRET,
                 num_warps=warps,
                 # no FMA contraction: LLVM narrows `x + bf16(y * g)` to bf16 ops and fuses them into one
                 # fma.rn.bf16, dropping the product's rounding (18% of the sums differed from torch)
                 **({} if INTERPRET else {"enable_fp_fusion": False}))
    if chunk:
        _residual_norm_chunked_kernel[(b * n,)](*args, CHUNK=chunk, **flags)
    else:
        _residual_norm_kernel[(triton.cdiv(b * n, rows),)](*args, ROWS=rows, BLOCK_D=triton.next_power_of_2(d),
                                                           **flags)
    return out, nrm


def _mode(weight, shift) -> int:
    """The norm the keywords ask for: affine (weight / bias), AdaLN (shift / scale) or plain."""
    return NORM_AFFINE if weight is not None else NORM_MODULATE if shift is not None else NORM_PLAIN


def add_norm(x, y, gate, eps, *, weight=None, bias=None, shift=None, scale=None):
    """(x + y * gate.to(x.dtype) [or x + y without gate], its LayerNorm) in x.dtype.

    The norm is affine (`weight`, `bias` fp32 [D]: norm3), or modulated (`shift`,
    `scale` [B, 1, D] fp32: shift + LN(.)(1 + scale), norm2), or plain."""
    mode = _mode(weight, shift)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(x, y, gate, out, mode, weight, bias, shift, scale, eps)


def norm(x, eps, *, weight=None, bias=None, shift=None, scale=None):
    """LN(x) in x.dtype: affine (`weight`, `bias`: norm3), modulated (`shift`, `scale`: norm1 /
    norm2 with AdaLN, shift + LN(x).to(x.dtype) * (1 + scale)), or plain; as `add_norm`'s norm."""
    mode = _mode(weight, shift)
    return _launch(x, None, None, None, mode, weight, bias, shift, scale, eps)[1]


def norm_stats(x, eps):
    """Per-row LayerNorm statistics of x [B, L, D]: [B, L, 2] fp32 (mean, rstd), as the norms here
    compute them; `w8a8_triton.quantize_norm` makes a norm's int8 codes from x and these."""
    return _launch(x, None, None, None, NORM_PLAIN, None, None, None, None, eps, stats=True)[1]


def gated_add(x, y, gate, out=None):
    """x + y * gate.to(x.dtype), rounded as torch's bf16 ops; written into `out` (may be a slice) if given."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"gated_add: out must be {tuple(x.shape)} {x.dtype} with unit last stride")
    return _launch(x, y, gate, out, NORM_NONE, None, None, None, None, 0.0)[0]
