"""DiT parity with the official implementation (fixtures in ../shared/fixtures).

Tolerances (fixtures README): fp32 engine max_abs <= 1e-4 * max|ref|;
bf16 engine rel_l2 <= 7.5e-3 and max_abs <= 0.05 against out.bf16.
"""
import pytest
import torch

from conftest import load_fixture, max_abs, rel_l2
from turbo_core.attention import sla_reference
from turbo_core.models import dit as dit_module
from turbo_core.models.dit_loader import dit_from_state_dict

BF16_REL, BF16_ABS = 7.5e-3, 0.05
MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def state_dict(fix, extra=None):
    sd = {k[3:]: v for k, v in fix.items() if k.startswith("sd.")}
    for k, v in (extra or {}).items():
        if k.startswith("sd."):
            sd[k[3:]] = v
    return sd


def check(out, ref, mode, what):
    if mode == "fp32":
        assert max_abs(out, ref) <= 1e-4 * float(ref.abs().max()), what
    else:
        assert rel_l2(out, ref) <= BF16_REL, (what, rel_l2(out, ref))
        assert max_abs(out, ref) <= BF16_ABS, (what, max_abs(out, ref))


def run_with_intermediates(model, x, t, ctx, y=None, **kw):
    rec = {}
    hooks = [model.patch_embedding.register_forward_hook(lambda m, i, o: rec.__setitem__("x_embed", o)),
             model.text_embedding.register_forward_hook(lambda m, i, o: rec.__setitem__("context_emb", o)),
             model.head.register_forward_hook(lambda m, i, o: rec.__setitem__("head_out", o))]
    for n, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, n=n: rec.__setitem__(f"block{n}_out", o)))
    out = model(x, t, ctx, y, **kw)
    for h in hooks:
        h.remove()
    rec["e"], rec["e0"] = model.time_embed(t)
    return out, rec


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["dit_t2v_tiny", "dit_i2v_tiny"])
def test_dense_parity_with_intermediates(fixture, mode):
    fix = load_fixture(f"{fixture}.safetensors")
    dt = MODES[mode]
    model = dit_from_state_dict(state_dict(fix), device="cpu", dtype=dt)
    y = fix["in.y"].to(dt) if "in.y" in fix else None
    t = fix["in.timesteps"].reshape(-1)
    out, rec = run_with_intermediates(model, fix["in.x"].to(dt), t, fix["in.context"].to(dt), y)

    # the cheap pieces first: these must be (almost) exact
    ref = fix[f"{mode}.x_embed"].float()
    assert ((rec["x_embed"].float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()  # <= 1 bf16 ulp
    assert torch.equal(rec["e"], fix[f"{mode}.e"])
    assert torch.equal(rec["e0"], fix[f"{mode}.e0"])
    _, tt, hh, ww = (s // p for s, p in zip((0,) + tuple(fix["in.x"].shape[2:]), (1, 1, 2, 2)))
    assert torch.equal(model.rope(tt, hh, ww)[0], fix[f"{mode}.rope_freqs"])
    for name in ("context_emb", "block0_out", "block1_out", "head_out"):
        check(rec[name], fix[f"{mode}.{name}"], mode, name)
    check(out, fix[f"out.{mode}"], mode, "out")
    if mode == "bf16":  # the bf16 engine is also close to the fp32 truth
        assert rel_l2(out, fix["out.fp32"]) <= 1.5 * 4.9e-3


@pytest.mark.parametrize("mode", MODES)
def test_sla_model_parity_and_block_maps(mode, monkeypatch):
    base = load_fixture("dit_t2v_tiny.safetensors")
    fix = load_fixture("dit_t2v_tiny_sla.safetensors")
    dt = MODES[mode]
    model = dit_from_state_dict(state_dict(base, fix), device="cpu", dtype=dt)
    assert model.load_report.layout.startswith("TurboWan (SLA)") and model.load_report.ok

    maps = []
    real = dit_module.self_attention

    def recording(q, k, v, backend, **kw):  # spy: records the block map, runs the real attention
        maps.append(sla_reference.block_map(q.transpose(1, 2), k.transpose(1, 2), kw["topk"])[0])
        return real(q, k, v, backend, **kw)

    monkeypatch.setattr(dit_module, "self_attention", recording)
    out = model(fix["in.x"].to(dt), fix["in.timesteps"].reshape(-1), fix["in.context"].to(dt),
                attention="sla", sla_topk=0.5)
    for layer, got in enumerate(maps):
        assert torch.equal(got, fix[f"{mode}.sla_sparse_map.layer{layer}"]), f"layer {layer} block map"
    # SLA runs in bf16 in both official runs, so the fp32 bound is the bf16 one (fixture README)
    assert rel_l2(out, fix[f"out.{mode}"]) <= BF16_REL
    assert max_abs(out, fix[f"out.{mode}"]) <= BF16_ABS


def test_quant_model_parity():
    base = load_fixture("dit_t2v_tiny.safetensors")
    fix = load_fixture("dit_t2v_tiny_quant.safetensors")
    sd = state_dict(base, fix)
    for key in [k for k in sd if k.endswith(".int8_weight")]:
        del sd[key[: -len("int8_weight")] + "weight"]
    args = (base["in.x"], base["in.timesteps"].reshape(-1), base["in.context"])
    model = dit_from_state_dict(sd, device="cpu", dtype=torch.bfloat16, linear="w8a8")
    assert model.load_report.layout.startswith("TurboWan -quant") and model.load_report.ok
    assert model.blocks[0].ffn[0].int8_weight.dtype == torch.int8  # kept int8 in memory
    out = model(*args)
    assert rel_l2(out, fix["out.bf16_w8a8"]) <= BF16_REL
    assert max_abs(out, fix["out.bf16_w8a8"]) <= BF16_ABS
    # the dequantizing fallback differs only by the activation quantisation
    model.set_linear_mode("dequant")
    assert rel_l2(model(*args), fix["out.bf16_w8a8"]) <= 2.5e-2


def test_batch_with_different_timesteps():
    fix = load_fixture("dit_t2v_tiny.safetensors")
    model = dit_from_state_dict(state_dict(fix), device="cpu", dtype=torch.float32)
    x = fix["in.x"].float()
    x2 = torch.cat([x, torch.randn_like(x)])
    t2 = torch.tensor([988.0, 608.0])
    ctx = fix["in.context"].float()
    both = model(x2, t2, ctx.expand(2, -1, -1))
    for i in range(2):
        single = model(x2[i:i + 1], t2[i:i + 1], ctx)
        assert max_abs(both[i:i + 1], single) <= 1e-4
    assert max_abs(both[:1], fix["out.fp32"]) <= 1e-4 * float(fix["out.fp32"].abs().max())


def test_input_errors_are_clear():
    fix = load_fixture("dit_i2v_tiny.safetensors")
    model = dit_from_state_dict(state_dict(fix), device="cpu", dtype=torch.float32)
    x, t, ctx = fix["in.x"].float(), fix["in.timesteps"].reshape(-1), fix["in.context"].float()
    with pytest.raises(ValueError, match="image-to-video"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :10], y=fix["in.y"].float())
    with pytest.raises(ValueError, match="attention"):
        model(x, t, ctx, y=fix["in.y"].float(), attention="flash")
