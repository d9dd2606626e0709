"""rCM sampler: schedule, bit-exact loop against the recorded upstream runs, experts, sizes."""
import json

import pytest
import torch

from conftest import fixture_path, load_fixture
from turbo_core.sampling.rcm import network_timestep, rcm_sample, rcm_timesteps
from turbo_core.sampling.sizes import (
    RESOLUTIONS, adaptive_size, latent_shape, validate_frames, validate_size,
)

TINY = (1, 16, 2, 4, 4)


class FakeNet:
    """The fixture's fake network: v = tanh(0.5*x_bf16.float() + c).to(bf16); records its inputs."""

    def __init__(self, c, name="net", dtype=torch.bfloat16, device="cpu", log=None):
        self.c, self.name, self.dtype, self.device = c, name, dtype, torch.device(device)
        self.calls = []
        self.log = log if log is not None else []

    def __call__(self, x, timestep, context, y=None, *, attention="sla", sla_topk=0.1):
        v = torch.tanh(0.5 * x.float() + self.c).to(torch.bfloat16)
        self.calls.append(dict(x=x.clone(), t=timestep.clone(), ctx=context, y=y, v=v.clone(),
                               attention=attention, sla_topk=sla_topk))
        self.log.append(self.name)
        return v


def ctx(b=1):
    return torch.randn(b, 5, 8)


@pytest.fixture(scope="module")
def schedule():
    return json.loads(fixture_path("rcm_schedule.json").read_text())


@pytest.fixture(scope="module")
def recorded():
    return load_fixture("rcm_sampler_tiny.safetensors")


# ---- schedule -------------------------------------------------------------------------

def test_schedule_matches_every_entry(schedule):
    entries = [(m, e) for m in ("t2v", "i2v") for e in schedule[m]]
    assert len(entries) == 24
    for mode, e in entries:
        ts = rcm_timesteps(e["num_steps"], e["sigma_max"])
        assert ts == e["t_rf_float64"], (mode, e["sigma_max"], e["num_steps"])  # bit-exact float64
        assert [network_timestep(t) for t in ts[:-1]] == e["timesteps_bf16_received"]


def test_loop_passes_recorded_timesteps_and_experts(schedule):
    for mode in ("t2v", "i2v"):
        for e in schedule[mode]:
            log = []
            high = FakeNet(0.1, "high" if mode == "i2v" else "t2v", log=log)
            models = (high, FakeNet(-0.2, "low", log=log)) if mode == "i2v" else high
            rcm_sample(models, ctx(), latent_shape=TINY, steps=e["num_steps"],
                       sigma_max=e["sigma_max"], ode=bool(e.get("ode", False)))
            assert log == e["model_per_step"], (mode, e["sigma_max"], e["num_steps"])
            calls = high.calls + (models[1].calls if mode == "i2v" else [])
            got = [float(c["t"][0]) for c in calls]
            assert got == e["timesteps_bf16_received"]
            assert all(c["t"].dtype == torch.bfloat16 and c["t"].shape == (1,) for c in calls)
            assert all(c["x"].dtype == torch.bfloat16 for c in calls)


def test_steps_and_sigma_refused():
    for bad in (0, 5, -1, 2.5):
        with pytest.raises(ValueError, match="between 1 and 4"):
            rcm_timesteps(bad, 80.0)
    with pytest.raises(ValueError, match="between 1 and 4"):
        rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, steps=5)
    with pytest.raises(ValueError, match="sigma_max"):
        rcm_timesteps(4, 0.0)


def test_known_values():
    assert rcm_timesteps(4, 80.0)[-1] == 0.0
    assert abs(rcm_timesteps(1, 200.0)[0] - 200 / 201) < 1e-15
    assert [network_timestep(t) for t in rcm_timesteps(4, 80.0)[:-1]] == [988.0, 932.0, 852.0, 608.0]


# ---- bit-exact reproduction of the recorded upstream loop -------------------------------

def _check_steps(rec, prefix, calls):
    assert len(calls) == 4
    for i, c in enumerate(calls):
        assert torch.equal(c["x"], rec[f"{prefix}.step{i}.x_in_bf16"]), f"x_in step {i}"
        assert torch.equal(c["v"], rec[f"{prefix}.step{i}.v_bf16"]), f"v step {i}"


def test_t2v_sde_bit_exact(recorded):
    p = "t2v_sigma80_4step_sde"
    noise = [recorded[f"{p}.init_noise"]] + [recorded[f"{p}.step{i}.fresh_noise"] for i in range(4)]
    net = FakeNet(0.1)
    out = rcm_sample(net, ctx(), latent_shape=TINY, steps=4, sigma_max=80.0, noise=noise)
    _check_steps(recorded, p, net.calls)
    assert out.dtype == torch.float32
    assert torch.equal(out, recorded[f"{p}.samples"])


def test_i2v_ode_bit_exact_with_two_experts(recorded):
    p = "i2v_sigma200_4step_ode"
    log = []
    high, low = FakeNet(0.1, "high", log=log), FakeNet(-0.2, "low", log=log)
    y = torch.randn(1, 20, 2, 4, 4)
    out = rcm_sample([high, low], ctx(), latent_shape=TINY, steps=4, sigma_max=200.0, ode=True,
                     y=y, noise=[recorded[f"{p}.init_noise"]])
    assert log == ["high", "high", "low", "low"]
    _check_steps(recorded, p, high.calls + low.calls)
    assert torch.equal(out, recorded[f"{p}.samples"])
    assert all(torch.equal(c["y"], y.to(torch.bfloat16)) for c in high.calls + low.calls)


def test_sde_product_is_fp32(recorded):
    # Doing t_next*noise in float64 would miss the recorded samples by ~1e-7 (fixture README).
    p = "t2v_sigma80_4step_sde"
    noise = [recorded[f"{p}.init_noise"]] + [recorded[f"{p}.step{i}.fresh_noise"] for i in range(4)]
    ts = rcm_timesteps(4, 80.0)
    x = noise[0].double() * ts[0]
    for i in range(4):
        v = recorded[f"{p}.step{i}.v_bf16"].double()
        x = (1 - ts[i + 1]) * (x - ts[i] * v) + ts[i + 1] * noise[i + 1].double()
    assert not torch.equal(x.float(), recorded[f"{p}.samples"])


def test_injected_noise_checked():
    with pytest.raises(ValueError, match="5 tensors"):
        rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, noise=[torch.randn(TINY)])
    with pytest.raises(ValueError, match="shape"):
        rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, ode=True, noise=[torch.randn(1, 16, 2, 4, 5)])


# ---- seeds and noise placement ----------------------------------------------------------

def test_seed_determinism():
    run = lambda seed: rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, seed=seed)  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cpu_generator_order():
    # noise_device="cpu": initial noise is the first randn of a CPU generator seeded with `seed`,
    # then one randn per step, so the same seed gives the same latent whatever the model device.
    seed = 3
    g = torch.Generator("cpu").manual_seed(seed)
    draws = [torch.randn(TINY, generator=g) for _ in range(5)]
    net = FakeNet(0.1)
    out = rcm_sample(net, ctx(), latent_shape=TINY, seed=seed, noise_device="cpu")
    t0 = rcm_timesteps(4, 80.0)[0]
    assert torch.equal(net.calls[0]["x"], (draws[0].double() * t0).to(torch.bfloat16))
    assert torch.equal(out, rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, noise=draws))
    # On a CPU-only machine the "model" generator is the same CPU generator.
    assert torch.equal(out, rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, seed=seed, noise_device="model"))


def test_ode_draws_only_initial_noise():
    g = torch.Generator("cpu").manual_seed(0)
    init = torch.randn(TINY, generator=g)
    a = rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, ode=True, seed=0)
    b = rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, ode=True, noise=[init])
    assert torch.equal(a, b)


# ---- experts, hooks, batch --------------------------------------------------------------

def test_offload_called_once_at_switch():
    log = []
    high, low = FakeNet(0.1, "high", log=log), FakeNet(-0.2, "low", log=log)

    def offload(active, inactive):
        log.append(("offload", active.name, inactive.name))

    rcm_sample((high, low), ctx(), latent_shape=TINY, sigma_max=200.0, offload=offload)
    assert log == ["high", "high", ("offload", "low", "high"), "low", "low"]


def test_offload_not_called_without_switch():
    calls = []
    rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, offload=lambda a, b: calls.append(1))
    rcm_sample((FakeNet(0.1), FakeNet(-0.2)), ctx(), latent_shape=TINY, steps=2,
               offload=lambda a, b: calls.append(1))
    assert calls == []


def test_callback_per_step_and_interrupt():
    seen = []
    rcm_sample(FakeNet(0.1), ctx(), latent_shape=TINY, steps=3,
               callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(0, 3, TINY), (1, 3, TINY), (2, 3, TINY)]

    class Stop(Exception):
        pass

    def stop(i, n, x):
        if i == 1:
            raise Stop

    net = FakeNet(0.1)
    with pytest.raises(Stop):
        rcm_sample(net, ctx(), latent_shape=TINY, callback=stop)
    assert len(net.calls) == 2


def test_batch_and_context_broadcast():
    shape = (2, 16, 2, 4, 4)
    net = FakeNet(0.1)
    out = rcm_sample(net, ctx(1), latent_shape=shape, attention="sagesla", sla_topk=0.15)
    assert out.shape == shape
    c = net.calls[0]
    assert c["ctx"].shape == (2, 5, 8) and c["t"].shape == (2,)
    assert c["attention"] == "sagesla" and c["sla_topk"] == 0.15
    with pytest.raises(ValueError, match="batch"):
        rcm_sample(FakeNet(0.1), ctx(3), latent_shape=shape)


def test_plain_callable_and_model_dtype():
    plain = lambda x, t, c, y=None, **kw: torch.zeros_like(x)  # noqa: E731
    assert rcm_sample(plain, ctx(), latent_shape=TINY).shape == TINY
    net = FakeNet(0.1, dtype=torch.float32)
    rcm_sample(net, ctx(), latent_shape=TINY)
    assert net.calls[0]["x"].dtype == torch.float32 and net.calls[0]["ctx"].dtype == torch.float32


# ---- sizes ------------------------------------------------------------------------------

def test_validate_frames():
    assert validate_frames(81) == 21 and validate_frames(77) == 20 and validate_frames(1) == 1
    assert validate_frames(121) == 31
    with pytest.raises(ValueError, match="80 frames: use 77 or 81"):
        validate_frames(80)
    with pytest.raises(ValueError, match="2 frames: use 1 or 5"):
        validate_frames(2)
    with pytest.raises(ValueError, match="at least 1"):
        validate_frames(0)


def test_validate_size():
    assert validate_size(832, 480) == (832, 480)
    with pytest.raises(ValueError, match="width 833: use 832 or 848"):
        validate_size(833, 480)
    with pytest.raises(ValueError, match="height 8: use 16"):
        validate_size(832, 8)
    with pytest.raises(ValueError, match="width 20: use 16 or 32; height 30: use 16 or 32"):
        validate_size(20, 30)


def test_latent_shape_and_presets():
    assert latent_shape(1, 81, 480, 832) == (1, 16, 21, 60, 104)
    assert latent_shape(2, 81, 720, 1280) == (2, 16, 21, 90, 160)
    for preset in RESOLUTIONS.values():
        assert set(preset) == {"16:9", "9:16", "4:3", "3:4", "1:1"}
        for w, h in preset.values():
            validate_size(w, h)
    assert RESOLUTIONS["720p"]["16:9"] == (1280, 720) and RESOLUTIONS["480p"]["9:16"] == (480, 832)


def test_adaptive_size():
    assert adaptive_size(1920, 1080, 1280, 720) == (1280, 720)
    assert adaptive_size(1080, 1920, 1280, 720) == (720, 1280)
    assert adaptive_size(1000, 1000, 1280, 720) == (960, 960)
    assert adaptive_size(800, 600, 1280, 720) == (1104, 832)
    w, h = adaptive_size(10000, 1, 832, 480)  # upstream would give height 0
    assert w % 16 == 0 and h == 16
