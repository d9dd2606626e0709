"""rCM few-step sampler (TurboWan T2V and Wan2.2-A14B I2V), spec section 4.

rCM is trained in TrigFlow time s, but the network is Wan's rectified-flow
velocity model, so the loop runs on RF times t = sin s / (sin s + cos s).
The arithmetic below (float64 state, fp32 noise product, bf16 timesteps) is
kept exactly as upstream does it, so a recorded run is reproduced bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .sizes import RESOLUTIONS, adaptive_size, latent_shape, validate_frames, validate_size

__all__ = [
    "MID_ANGLES", "MAX_STEPS", "rcm_timesteps", "network_timestep", "rcm_sample", "draw_noise",
    "RESOLUTIONS", "adaptive_size", "latent_shape", "validate_frames", "validate_size",
]

# TrigFlow angles (radians) of the intermediate steps; upstream's "better quality" set.
MID_ANGLES = (1.5, 1.4, 1.0)
MAX_STEPS = len(MID_ANGLES) + 1


def rcm_timesteps(steps: int, sigma_max: float) -> list[float]:
    """RF times [t0, ..., 0.0] (steps+1 float64 values) for a `steps`-step run.

    t0 = sigma_max / (1 + sigma_max): 80 -> 0.98765, 200 -> 0.99502.
    """
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS} (rCM is distilled for 1-4 steps), got {steps!r}")
    if not (sigma_max > 0 and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_max must be a positive number, got {sigma_max!r}")
    angles = [math.atan(sigma_max), *MID_ANGLES[: int(steps) - 1], 0.0]
    # torch float64 on CPU, like upstream: the same bits on every machine.
    s = torch.tensor(angles, dtype=torch.float64)
    return (torch.sin(s) / (torch.cos(s) + torch.sin(s))).tolist()


def network_timestep(t) -> float:
    """The timestep value the DiT sees for RF time t: bf16(t * 1000), e.g. 988, 932, 852, 608.

    Upstream rounds t to fp32 first and multiplies by 1000 in float64; kept, so the
    bf16 rounding lands on the same value. The result is exactly representable in bf16.
    """
    t32 = torch.as_tensor(float(t), dtype=torch.float64).float()
    return float((t32.double() * 1000).to(torch.bfloat16))


def _as_experts(models) -> tuple[Callable, Callable | None]:
    if isinstance(models, (list, tuple)):
        if len(models) == 1:
            return models[0], None
        if len(models) == 2:
            return models[0], models[1]
        raise ValueError(f"models: expected one model or a (high_noise, low_noise) pair, got {len(models)}")
    return models, None


def _batched(name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has batch {tensor.shape[0]}, the latent has batch {batch} (use 1 or {batch})")


def _injected_noise(noise, shape: tuple, needed: int) -> list[torch.Tensor]:
    items = [noise] if isinstance(noise, torch.Tensor) else list(noise)
    if len(items) < needed:
        raise ValueError(f"noise: {needed} tensors needed ([initial, step1, ...]), got {len(items)}")
    for i, n in enumerate(items[:needed]):
        if tuple(n.shape) != shape:
            raise ValueError(f"noise[{i}] has shape {tuple(n.shape)}, expected {shape}")
    return items[:needed]


def draw_noise(latent_shape: Sequence[int], *, steps: int, seed: int, ode: bool = False,
               device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The noise rcm_sample draws for `seed`, in its order: [initial, step 1, ..., step N] ([initial] for ODE).

    rcm_sample(noise=draw_noise(...)) equals rcm_sample(seed=...) bit for bit; a
    sequence-parallel run draws it on rank 0 and broadcasts it.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    shape = tuple(int(s) for s in latent_shape)
    count = 1 if ode else int(steps) + 1
    return [torch.randn(shape, dtype=torch.float32, device=device, generator=gen) for _ in range(count)]


class _Conditioning:
    """context / y moved to each expert's device and dtype once (not every step)."""

    def __init__(self, context: torch.Tensor, y: torch.Tensor | None):
        self.context, self.y, self._cache = context, y, {}

    def for_model(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            ctx = self.context.to(device=device, dtype=dtype)
            y = None if self.y is None else self.y.to(device=device, dtype=dtype)
            self._cache[key] = (ctx, y)
        return self._cache[key]


@torch.no_grad()
def rcm_sample(
    models,
    context: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    steps: int = 4,
    sigma_max: float = 80.0,
    seed: int = 0,
    y: torch.Tensor | None = None,
    boundary: float = 0.9,
    ode: bool = False,
    noise: Sequence[torch.Tensor] | torch.Tensor | None = None,
    noise_device: str | torch.device = "cpu",
    attention: str = "sla",
    sla_topk: float = 0.1,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    offload: Callable[[Callable, Callable], None] | None = None,
) -> torch.Tensor:
    """Run the rCM loop and return the final normalized latent (float32, on the model's device).

    models: one model (T2V) or a (high_noise, low_noise) pair (Wan2.2-A14B I2V). A
        model is called as `model(x, timestep, context, y=y, attention=..., sla_topk=...)`
        and returns the velocity. x is in the model's `.dtype` (default bf16) on its
        `.device` (default: the context's device); timestep is a bfloat16 tensor [B]
        holding bf16(t*1000) (see network_timestep); context/y are cast to the same
        dtype and device.
    context: [B, L, D] text embedding; a batch of 1 is broadcast to B = latent_shape[0].
    y: I2V conditioning [B, 20, T, H, W] (mask + image latent), or None.
    boundary: with two experts, the high-noise one runs while t >= boundary (float64).
    ode: Euler steps without fresh noise (I2V --ode); default is the SDE update.
    noise: optional injected noise [initial, step1, ..., stepN] (fp32, latent shape)
        used instead of the generator; ODE needs only [initial].
    noise_device: where the torch.Generator lives. "cpu" (default) makes a seed give
        the same video on any GPU; "cuda" or "model" (the first expert's device)
        reproduce the official scripts' cuda generator.
    callback(step_index, total_steps, x): after each step; step_index is 0-based and
        x is the float64 working latent. Exceptions propagate (used to interrupt).
    offload(active_model, inactive_model): called once, right before the first
        low-noise step, with (low_noise, high_noise), so the caller can park the high
        expert on the CPU and bring the low expert to the GPU. Not called for one model.
    """
    t_steps = rcm_timesteps(steps, sigma_max)
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 5:
        raise ValueError(f"latent_shape must be (B, C, T, H, W), got {tuple(latent_shape)}")
    batch = shape[0]
    if context.ndim != 3:
        raise ValueError(f"context must be [B, L, D], got shape {tuple(context.shape)}")
    context = _batched("context", context, batch)
    if y is not None:
        if y.ndim != 5 or tuple(y.shape[2:]) != shape[2:]:
            raise ValueError(f"y must be [B, C, {shape[2]}, {shape[3]}, {shape[4]}], got {tuple(y.shape)}")
        y = _batched("y", y, batch)
    cond = _Conditioning(context, y)

    high, low = _as_experts(models)

    def device_of(model) -> torch.device:
        return torch.device(getattr(model, "device", context.device))

    # Noise source: injected tensors, or one generator drawn in upstream's order
    # (initial noise first, then one draw per SDE step, the last one included).
    if noise is not None:
        injected = iter(_injected_noise(noise, shape, 1 if ode else steps + 1))
        draw = lambda: next(injected)  # noqa: E731
    else:
        gen_device = device_of(high) if str(noise_device) == "model" else torch.device(noise_device)
        gen = torch.Generator(device=gen_device).manual_seed(int(seed))
        draw = lambda: torch.randn(shape, dtype=torch.float32, device=gen_device, generator=gen)  # noqa: E731

    active, switched = high, False
    dev = device_of(active)
    x = draw().to(device=dev, dtype=torch.float32).double() * t_steps[0]

    for i in range(steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if low is not None and not switched and t_cur < boundary:
            switched = True
            if offload is not None:
                offload(low, high)
            active = low
        dev = device_of(active)
        dtype = getattr(active, "dtype", torch.bfloat16)
        ctx, y_in = cond.for_model(dev, dtype)
        x = x.to(dev)
        timestep = torch.full((batch,), network_timestep(t_cur), dtype=torch.bfloat16, device=dev)

        v = active(x.to(dtype), timestep, ctx, y=y_in, attention=attention, sla_topk=sla_topk)
        if tuple(v.shape) != shape:
            raise ValueError(f"model returned shape {tuple(v.shape)}, expected {shape}")
        v = v.to(device=dev, dtype=torch.float64)

        # 0-dim float64 tensors on purpose: `t_next * noise` must stay fp32, as upstream.
        tc = torch.tensor(t_cur, dtype=torch.float64, device=dev)
        tn = torch.tensor(t_next, dtype=torch.float64, device=dev)
        if ode:
            x = x - (tc - tn) * v
        else:
            eps = draw().to(device=dev, dtype=torch.float32)
            x = (1 - tn) * (x - tc * v) + tn * eps
        if callback is not None:
            callback(i, steps, x)

    return x.float()
