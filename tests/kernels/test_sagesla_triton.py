"""SageSLA-class Triton kernel (int8 q/k, fp8 or fp16 V) vs references.

Runs in triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1). fp8 works there: fp8 tensors are loaded and upcast exactly, and the
kernels round to the e4m3 grid themselves before the cast (the interpreter's own
fp32->fp8 rounding is wrong), so the fp8-V path is tested too.

Checks:
  * q/k int8 codes and block scales bit-exact to a torch statement of the scheme;
    V fp8 codes bit-exact to torch's float8_e4m3fn conversion;
  * the block map is the SLA one (fixture sla_op: exact);
  * error against fp64 dense softmax attention restricted to the same selected
    blocks (random N(0,1) inputs, no proj_l), measured on the interpreter:
        SLA (bf16)            ~2e-3 rel_l2
        int8 QK + fp16 V      ~1.0e-2 .. 1.3e-2   (bound 2e-2)
        int8 QK + fp8 V / P   ~3.5e-2 .. 3.7e-2   (bound 5e-2)
    fp8 e4m3 has 3 mantissa bits: rounding P and V each costs ~2.5% rms on
    random data, whose attention output is small (averages of random vectors);
  * sla_op fixture (with proj_l): fp16 V 1.2e-2, fp8 V 2.9e-2 rel_l2 to `out`;
  * fp16 V with a channel past fp16's range: scaled on load, finite and as close.
"""
import math
import os
import random

import pytest
import torch
from conftest import load_fixture, max_abs, rel_l2
from turbo_core.kernels import sagesla_triton, sla_triton
from turbo_core.attention import sla_reference as ref

SEED = int(os.environ.get("TURBO_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
SAGE_F16_V_BOUND = 2e-2
SAGE_FP8_V_BOUND = 5e-2


def _inputs(n, h, offset, d=128):
    g = torch.Generator().manual_seed(SEED + offset)
    q, k, v = (torch.randn(1, n, h, d, generator=g).to(torch.bfloat16) for _ in range(3))
    k = k + 0.3 * torch.randn(1, 1, h, d, generator=g).to(torch.bfloat16)
    return q, k, v


def _dense_on_selection(q, k, v, lut, blkq=128, blkk=64):
    """fp64 softmax attention where query block i sees only its LUT's key blocks."""
    n = q.shape[1]
    smap = sla_triton.lut_to_map(lut, -(-n // blkk)).bool()
    allowed = smap.repeat_interleave(blkq, 2)[:, :, :n].repeat_interleave(blkk, 3)[..., :n]
    qd, kd, vd = (t.transpose(1, 2).double() for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ vd).transpose(1, 2)


def _quant_ref(x, blk):
    """[B,H,L,D] fp32 -> int8 codes, [B,H,nb] scales: max|x|/127 + 1e-7, round half away from zero."""
    b, h, n, d = x.shape
    nb = -(-n // blk)
    xp = torch.nn.functional.pad(x, (0, 0, 0, nb * blk - n)).view(b, h, nb, blk, d)
    scale = xp.abs().amax(dim=(3, 4)) / 127.0 + 1e-7
    y = xp / scale[..., None, None]
    codes = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8).view(b, h, nb * blk, d)[:, :, :n]
    return codes, scale


def test_qk_int8_codes_and_scales_exact():
    q, k, v = _inputs(333, 2, 1)
    lut, (qc, qs, kc, ks) = sla_triton.block_lut(q, k, 0.3, quant=True)
    assert torch.equal(lut, sla_triton.block_lut(q, k, 0.3))  # same map as SLA
    rq, rqs = _quant_ref(q.transpose(1, 2).float(), 128)
    kt = k.transpose(1, 2)
    rk, rks = _quant_ref((kt - kt.mean(-2, keepdim=True)).float(), 64)  # centred k, rounded to bf16
    assert torch.equal(qc, rq) and torch.equal(qs, rqs)
    assert torch.equal(kc, rk) and torch.equal(ks, rks)
    assert qc.abs().max() == 127 and kc.abs().max() == 127


def test_v_fp8_codes_exact():
    _, _, v = _inputs(200, 2, 2)
    v[0, 5, 1, 7] = 3e-4  # something in the fp8 subnormal range after scaling
    vt, vsc = sagesla_triton.quantize_v_fp8(v)
    assert vt.dtype == torch.float8_e4m3fn and vt.shape == (2, 128, 256)
    lo, hi = torch.aminmax(v, dim=1)
    amax = torch.maximum(hi.float(), -lo.float()).clamp_min(1e-8)
    expect = (v.float() * (448.0 / amax)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    expect = expect[0].permute(1, 2, 0)  # [H, D, L]
    assert torch.equal(vt[:, :, :200].view(torch.uint8), expect.view(torch.uint8))
    assert not vt[:, :, 200:].view(torch.uint8).any()  # padding is zero
    assert torch.equal(vsc, (amax / 448.0)[0])


@pytest.mark.parametrize("n,h,topk", [(200, 1, 0.5), (333, 3, 0.3), (608, 2, 0.1)])
def test_error_against_dense_on_same_selection(n, h, topk):
    q, k, v = _inputs(n, h, n)
    lut = sla_triton.block_lut(q, k, topk)
    dense = _dense_on_selection(q, k, v, lut)
    sla = sla_triton.sla_forward(q, k, v, None, None, topk)
    s16 = sagesla_triton.sagesla_forward(q, k, v, None, None, topk, v_fp8=False)
    s8 = sagesla_triton.sagesla_forward(q, k, v, None, None, topk, v_fp8=True)
    errs = dict(sla=rel_l2(sla, dense), sage_f16_v=rel_l2(s16, dense), sage_fp8_v=rel_l2(s8, dense))
    print(f"n={n} h={h} topk={topk} rel_l2 vs dense-on-selection: {errs}")
    assert errs["sla"] <= 5e-3, (SEED, errs)
    assert errs["sage_f16_v"] <= SAGE_F16_V_BOUND, (SEED, errs)
    assert errs["sage_fp8_v"] <= SAGE_FP8_V_BOUND, (SEED, errs)
    assert max_abs(s16, dense) <= 0.1 and max_abs(s8, dense) <= 0.25, SEED


@pytest.mark.parametrize("blkq,blkk", [(128, 64), (64, 128)])
def test_every_gpu_config(blkq, blkk):
    """Each usable GPU config, int8 QK with fp8 or fp16 V, on both block maps."""
    q, k, v = _inputs(333, 2, 40 + blkq)
    lut, (qc, qs, kc, ks) = sla_triton.block_lut(q, k, 0.5, blkq, blkk, quant=True)
    dense = _dense_on_selection(q, k, v, lut, blkq, blkk)
    vt, vsc = sagesla_triton.quantize_v_fp8(v)
    for v_fp8, bound in ((False, SAGE_F16_V_BOUND), (True, SAGE_FP8_V_BOUND)):
        v16 = dict(vsc=sagesla_triton.fp16_v_scale(sagesla_triton.channel_absmax(v)))
        sage = dict(qc=qc, qs=qs, kc=kc, ks=ks, **(dict(vt=vt, vsc=vsc) if v_fp8 else v16))
        configs = sla_triton.usable_configs(sla_triton.ATTN_CONFIGS, blkq, True, v_fp8)
        assert configs
        configs += [dict(NBI=2, ROWS=64, TMA=False, num_warps=4), dict(NBI=2, ROWS=64, num_warps=4)]
        for cfg in configs:
            out = sla_triton.attention_launch(q, k, v, lut, sage=sage, blkq=blkq, blkk=blkk,
                                              config=dict(cfg, num_stages=1))
            assert rel_l2(out, dense) <= bound, (SEED, cfg, v_fp8)


def test_sla_op_fixture_with_proj_l():
    fix = load_fixture("sla_op.safetensors")
    q, k, v = fix["in.q"], fix["in.k"], fix["in.v"]
    lut, _ = sla_triton.block_lut(q, k, 0.5, quant=True)
    assert torch.equal(sla_triton.lut_to_map(lut, 10), fix["sparse_map"])
    w, b = fix["proj_l.weight"], fix["proj_l.bias"]
    o16 = sagesla_triton.sagesla_forward(q, k, v, w, b, 0.5, v_fp8=False)
    o8 = sagesla_triton.sagesla_forward(q, k, v, w, b, 0.5, v_fp8=True)
    assert o8.shape == q.shape and o8.dtype == torch.bfloat16
    assert rel_l2(o16, fix["out"]) <= SAGE_F16_V_BOUND
    assert rel_l2(o8, fix["out"]) <= SAGE_FP8_V_BOUND


def test_backend_and_fallback():
    q, k, v = _inputs(150, 1, 3)
    w = (torch.randn(128, 128) / 11.3).to(torch.bfloat16)
    out = sagesla_triton.sagesla_backend(q, k, v, w, None, 0.5)
    assert torch.equal(out, sagesla_triton.sagesla_forward(q, k, v, w, None, 0.5, v_fp8=True))
    # head dim 96: no int8 kernel -> SLA path -> (unsupported there too) the reference
    q2, k2, v2 = (t[..., :96].contiguous() for t in (q, k, v))
    out2 = sagesla_triton.sagesla_backend(q2, k2, v2, None, None, 0.5)
    assert torch.equal(out2, ref.sla_attention(q2, k2, v2, None, None, topk=0.5))


def test_fp16_v_past_its_range():
    """A V channel beyond 65504 is scaled into fp16 on load (others stay exact, scale 1)."""
    q, k, v = _inputs(300, 2, 5)
    v[0, :, 1, 3] *= 4e5  # one channel of head 1 up to ~1e6: inf in fp16 without the scale
    sc = sagesla_triton.fp16_v_scale(sagesla_triton.channel_absmax(v))
    assert sc.shape == (2, 128) and sc[1, 3] > 1 and (sc.flatten().ne(1).sum() == 1)
    lut = sla_triton.block_lut(q, k, 0.5)
    dense = _dense_on_selection(q, k, v, lut)
    out = sagesla_triton.sagesla_forward(q, k, v, None, None, 0.5, v_fp8=False)
    assert torch.isfinite(out).all()
    assert rel_l2(out[:, :, 1, 3], dense[:, :, 1, 3]) <= SAGE_F16_V_BOUND, SEED
    assert rel_l2(out, dense) <= SAGE_F16_V_BOUND, SEED
