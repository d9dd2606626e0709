"""SageSLA's q/k int8 block codes on the GPU against the torch statement of the scheme (scale =
max|x|/127 + 1e-7, code = round half away from zero of x / scale). The kernel rounds with adds and
a bit cast, which the CPU interpreter checks bit for bit (tests/kernels/test_sagesla_triton.py);
only the GPU compiles it. On CUDA torch divides a tensor by a Python number as a product with its
reciprocal, so its scales can be one ulp from the kernel's IEEE quotient (H100: 19 of 576 q
blocks, 49 of 1128 k blocks at L = 3000, 12 heads); the codes are checked exactly against the
statement applied with the kernel's scales."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _blocks(x, blk):
    b, h, n, d = x.shape
    nb = -(-n // blk)
    return torch.nn.functional.pad(x, (0, 0, 0, nb * blk - n)).view(b, h, nb, blk, d)


def _check(codes, scales, x, blk):
    xp = _blocks(x, blk)
    ref_scales = xp.abs().amax(dim=(3, 4)) / 127.0 + 1e-7
    assert ((scales - ref_scales).abs() <= 1.2e-7 * ref_scales).all()  # within one fp32 ulp
    y = xp / scales[..., None, None]  # tensor / tensor: IEEE division on CUDA
    ref = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8).flatten(2, 3)[:, :, :x.shape[2]]
    assert torch.equal(codes, ref), int((codes != ref).sum())
    assert codes.abs().max() == 127


@pytest.mark.parametrize("n,heads", [(3000, 12), (777, 40)])
def test_qk_int8_codes_on_the_gpu(n, heads):
    from turbo_core.kernels import sla_triton

    g = torch.Generator("cuda").manual_seed(n)
    q = torch.randn(2, n, heads, 128, device="cuda", generator=g).bfloat16()
    k = (torch.randn(2, n, heads, 128, device="cuda", generator=g) * 3 + 1).bfloat16()
    q[0, :5] *= 40  # a few large rows: most codes of their blocks small
    _, (qc, qs, kc, ks) = sla_triton.block_lut(q, k, 0.2, quant=True)
    _check(qc, qs, q.transpose(1, 2).float(), 128)
    kt = k.transpose(1, 2)
    _check(kc, ks, (kt - kt.mean(dim=-2)[:, :, None]).float(), 64)  # centred k, rounded to bf16
