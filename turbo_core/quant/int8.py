"""W8A8 int8 linear layers as TurboWan `-quant` checkpoints store them.

Weights: int8 [out, in] with one fp32 scale per 128x128 tile.
Activations (W8A8 mode): quantized on the fly per 128 tokens x 128 channels.
Both use  scale = amax/128,  q = round_half_even(x * 128/amax) saturated to [-128, 127].

This file is the reference and the CPU path; the Triton kernels issue plugs a
fast GEMM in through `Int8Linear.kernel`.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("turbo_core")

TILE = 128


def _pad_to_tiles(x: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    return F.pad(x, (0, -cols % TILE, 0, -rows % TILE))


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 scales [ceil(M/128), ceil(K/128)]).

    Out-of-range rows/columns of a partial tile count as 0, as in the CUDA kernel.
    """
    m, k = x.shape
    t = _pad_to_tiles(x.float())
    mt, kt = t.shape[0] // TILE, t.shape[1] // TILE
    tiles = t.view(mt, TILE, kt, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)  # [mt, kt]
    # Multiply by 128/amax (not divide by the scale): the kernel's formula.
    mult = (128.0 / amax)[:, None, :, None]
    q = torch.round(tiles * mult).clamp_(-128, 127).to(torch.int8)  # torch.round is half-to-even
    return q.view(mt * TILE, kt * TILE)[:m, :k].contiguous(), amax / 128.0


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """int8 [N, K] + tile scales -> weight [N, K] in `dtype`."""
    n, k = q.shape
    nt, kt = scale.shape
    # a broadcast view of the scales (repeat_interleave built index tensors and gathered, twice)
    s = scale.float()[:, None, :, None].expand(nt, TILE, kt, TILE).reshape(nt * TILE, kt * TILE)[:n, :k]
    return (q.float() * s).to(dtype)


def w8a8_linear_reference(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The official W8A8 math in kernel order, exact on any device.

    Per 128-wide K tile the int products are summed exactly (|sum| < 2^24 fits
    fp32) and added to the fp32 accumulator with one fused multiply-add by
    s_x*s_w (an fp32 product): the official kernel's `acc += float(tile) * scale`,
    which nvcc contracts into an FFMA. The FMA is taken in fp64, which holds
    tile * scale exactly (21 + 24 bits), so it rounds once, as the GPU's does,
    except for a double rounding about once in 2^29 additions. The result is
    cast to x's dtype and the bias is added in that dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q_x, s_x = quantize_int8(x2)
    m, k = q_x.shape
    n = q_w.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    row_tile = torch.arange(m, device=x.device) // TILE
    col_tile = torch.arange(n, device=x.device) // TILE
    for kt in range(-(-k // TILE)):
        cols = slice(kt * TILE, (kt + 1) * TILE)
        part = q_x[:, cols].float() @ q_w[:, cols].float().t()
        scale = s_x[row_tile, kt][:, None] * s_w[col_tile, kt][None, :]
        acc = torch.addcmul(acc.double(), part.double(), scale.double()).float()
    y = acc.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape[:-1], n)


@torch.compiler.disable  # Triton kernels run eagerly inside compiled blocks (a graph break)
def _run_outside_graph(kernel, *args):
    return kernel(*args)


def run_eager(kernel, *args):
    """kernel(*args), kept out of torch.compile graphs. Eager callers skip the disabled
    wrapper: entering it costs ~10 us of CPU per call, and 1.3B steps are launch-bound."""
    if compiling():
        return _run_outside_graph(kernel, *args)
    return kernel(*args)


def compiling() -> bool:
    """Inside torch.compile tracing (torch.compiler.is_compiling is torch >= 2.3)."""
    probe = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return probe()


class QuantizedInput(NamedTuple):
    """An activation quantised once for several W8A8 layers that read the same input."""
    codes: torch.Tensor  # int8 [M, K]
    scales: torch.Tensor  # fp32 [ceil(M/128), ceil(K/128)]
    shape: torch.Size  # the input's shape, [..., K]
    dtype: torch.dtype  # the input's dtype: the layers' output dtype


def shared_input(x: torch.Tensor, layers, gelu: bool = False) -> torch.Tensor | QuantizedInput:
    """x quantised once when every layer is an Int8Linear that will run the W8A8 kernel on it
    (q/k/v of the self-attention read the same x: one activation pass instead of three), else x.
    Bit-identical either way: each layer would quantise x to the same codes.

    gelu=True: the layers read GELU_tanh(x) (the FFN hidden state). The kernel's pass applies
    the GELU as it quantises (on the GPU within a few fp32 ulps of torch's GELU before the
    rounding to x's dtype; exact in the interpreter); otherwise torch's GELU of x is returned."""
    if isinstance(x, QuantizedInput):  # quantised already (a norm that went straight to int8)
        return x
    kernel = w8a8_kernel_for(x, layers)
    if kernel is None:
        return F.gelu(x, approximate="tanh") if gelu else x
    codes, scales = run_eager(kernel.quantize, x.reshape(-1, x.shape[-1]), gelu)
    return QuantizedInput(codes, scales, x.shape, x.dtype)


def w8a8_kernel_for(x: torch.Tensor, layers):
    """The installed W8A8 kernel when every one of `layers` (at least one) is an Int8Linear in
    mode "w8a8" and the kernel supports x; else None."""
    kernel = Int8Linear.kernel
    if kernel is None or not layers or not all(isinstance(m, Int8Linear) and m.mode == "w8a8" for m in layers) \
            or not kernel.supports(x):
        return None
    return kernel


def token_rows(x: torch.Tensor | QuantizedInput, start: int, stop: int):
    """Tokens start:stop of x [B, L, ...]. A QuantizedInput only for B = 1 and a start on a
    128-row tile: its codes and tile scales are then those of the slice quantised alone."""
    if not isinstance(x, QuantizedInput):
        return x[:, start:stop]
    if x.shape[0] != 1 or start % TILE:
        raise ValueError(f"token_rows: a quantised input slices only for B = 1 at multiples of {TILE}")
    return QuantizedInput(x.codes[start:stop], x.scales[start // TILE:-(-stop // TILE)],
                          torch.Size((1, stop - start, x.shape[-1])), x.dtype)


def linear_residual(layer, x, residual: torch.Tensor, gate: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor | None:
    """residual + layer(x) * gate.to(dtype) (gate None: residual + layer(x)), added by the W8A8
    GEMM's epilogue, so the layer's output is never written and read back; written to `out`
    when given. None where that path does not apply (the caller adds): not an Int8Linear running
    the kernel, a gate that differs between batch entries, a residual or out that is not one
    contiguous [..., N] block. Rounded as torch's ops in x's dtype (and the fused row kernels)."""
    kernel = None if compiling() else w8a8_kernel_for(residual, (layer,))  # residual: x's dtype and device
    if kernel is None:
        return None
    n = layer.out_features
    if gate is not None and gate.numel() != n:  # one gate for all rows only ([1, 1, N] or B == 1)
        return None
    if not residual.is_contiguous() or residual.shape[-1] != n or (out is not None and not out.is_contiguous()):
        return None
    qx = x if isinstance(x, QuantizedInput) else shared_input(x, (layer,))
    if not isinstance(qx, QuantizedInput) or residual.dtype != qx.dtype or residual.numel() != qx.codes.shape[0] * n:
        return None
    return run_eager(kernel.gemm, qx, layer.int8_weight, layer.scale, layer.bias, residual, gate, out)


class Int8Linear(nn.Module):
    """A Linear whose weight stays int8 in memory (half the bytes of bf16).

    mode "dequant": weight tiles -> compute dtype, then F.linear (fast anywhere).
    mode "w8a8":    the exact official W8A8 arithmetic: the Triton kernel when the kernels
                    module installed it and it supports x, else the reference (slow on CPU).
    (The model's "auto" picks one of the two per GPU: `choose_mode`.)
    """

    kernel = None  # set by turbo_core.kernels when a fast W8A8 GEMM is available

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        tiles = (-(-out_features // TILE), -(-in_features // TILE))
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(tiles, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.mode = "dequant"

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        if isinstance(x, QuantizedInput):  # from shared_input: the kernel is installed and takes it
            return run_eager(type(self).kernel.gemm, x, self.int8_weight, self.scale, self.bias)
        if self.mode == "w8a8":
            kernel = type(self).kernel
            if kernel is not None and kernel.supports(x):
                return self.forward_kernel(x)
            return w8a8_linear_reference(x, self.int8_weight, self.scale, self.bias)
        return self.forward_dequant(x)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The installed W8A8 kernel on x (the caller checked `kernel.supports(x)`)."""
        return run_eager(type(self).kernel, x, self.int8_weight, self.scale, self.bias)

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """Weight tiles dequantised to x's dtype, then F.linear."""
        w = dequantize_int8(self.int8_weight, self.scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# ---------------------------------------------------------------------------
# linear="auto": the faster of the W8A8 kernel and dequant + cuBLAS, measured per GPU

_choices: dict = {}  # (GPU name, layer shapes, tokens, dtype, context) -> mode


def _time_once(fn, queue_ms: float = 0.0) -> float:
    """GPU ms of fn(). With queue_ms, the GPU first spins for about that long (at <= 2 GHz), so
    the launches of fn() queue up behind it: the GPU's time, not the CPU's pace of launching."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queue_ms:
        torch.cuda._sleep(int(queue_ms * 2e6))
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_both(layers: list[Int8Linear], run, reps: int) -> tuple[str, str, bool]:
    """(mode, why, warn): `run()` timed with the layers in each mode (restored after). The
    modes alternate call by call, medians compared, so a clock that drifts while the GPU warms
    up again after the compiles and autotuning of the first calls affects both alike. Each
    timed call queues behind a GPU spin twice as long as its launches took: timed as it came
    (start event, launches, end event), a block whose launches are about as slow as its GPU
    work measured the CPU, and tied (H100, 1.3B: 9.12 vs 9.12 ms, then dequant picked; queued:
    W8A8 6.67 vs dequant 7.75 ms, steady)."""
    def use(mode):
        for m in layers:
            m.mode = mode

    before = [m.mode for m in layers]
    times: dict[str, list[float]] = {"dequant": [], "w8a8": []}
    launch_ms = 0.0  # the CPU's time to launch one run() after the warm-up (either mode)
    try:
        for mode in times:  # compile / autotune, then let the GPU settle
            use(mode)
            try:
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run()
                launch_ms = max(launch_ms, min((time.perf_counter() - t0) * 1e3, 100.0))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a kernel that cannot build or run here must not break generation
                if mode == "dequant":
                    raise
                return "dequant", f"the W8A8 kernel failed on this GPU ({type(exc).__name__}: {exc})", True
        for _ in range(reps):
            for mode in times:
                use(mode)
                times[mode].append(_time_once(run, 2 * launch_ms))
    finally:
        for m, mode in zip(layers, before):
            m.mode = mode
    t_dequant, t_w8a8 = (statistics.median(times[m]) for m in ("dequant", "w8a8"))
    # near a tie keep dequant + cuBLAS, the path with the most hours on it
    mode = "w8a8" if t_w8a8 < 0.97 * t_dequant else "dequant"
    return mode, f"W8A8 kernel {t_w8a8:.2f} ms vs dequant + cuBLAS {t_dequant:.2f} ms per block", False


def choose_mode(layers: list[Int8Linear], run, tokens: int, dtype: torch.dtype, device: torch.device,
                context: tuple = (), reps: int = 7) -> str:
    """"w8a8" or "dequant" for these int8 layers at `tokens` rows on `device`.

    On CUDA with the W8A8 kernel installed, `run()` -- work through these layers as a
    generation does it; the model passes forwards of its blocks in turn, on the real inputs --
    is timed with the layers in each mode, and the faster is kept for this GPU, layer shapes,
    token count, dtype and `context` (what else changes the timing: the FFN's pass size).
    Timing blocks, not each layer in a loop, sees what a step sees: one activation
    quantisation shared by q/k/v, the FFN's passes, weights streamed from memory (a layer
    timed alone keeps its weight in L2, which flattered dequant + cuBLAS: it picked dequant
    at 1.3B on an H100 whose W8A8 step is 12% faster, bench/RESULTS.md). GPUs whose
    int8 tensor cores are 4x their bf16 rate with fp32 accumulation (GeForce RTX 30/40/50)
    should pick the kernel. A kernel that fails here is never used, nor is one there is no
    memory to time: dequant, and the reason is logged. Elsewhere: "dequant".
    """
    kernel = Int8Linear.kernel
    if device.type != "cuda" or not layers:
        return "dequant"
    key = (torch.cuda.get_device_name(device), tuple((m.in_features, m.out_features) for m in layers), tokens,
           dtype, context)
    if key in _choices:
        return _choices[key]
    if kernel is None or not kernel.supports(torch.empty(1, TILE, device=device, dtype=dtype)):
        mode, why, warn = "dequant", "no W8A8 kernel for this GPU", False
    else:
        try:
            mode, why, warn = _time_both(layers, run, reps)
        except torch.cuda.OutOfMemoryError:  # timing must never be what runs a generation out of memory
            torch.cuda.empty_cache()
            mode, why, warn = "dequant", "not enough free GPU memory to time the W8A8 kernel", True
    _choices[key] = mode
    (log.warning if warn else log.info)(
        "int8 linears on %s at %d tokens: %s (%s)", key[0], tokens, "W8A8 kernel" if mode == "w8a8"
        else "dequantised weights + cuBLAS", why)
    return mode
