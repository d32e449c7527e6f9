"""Kernel benchmarks: fused_gap_loss and the fused projector, forward + backward, per backend."""

import pytest
import torch

import regap_fast

from conftest import DEVICE, DTYPE, ON_GPU, backend_params, synchronized

# (B, Ni, Nt, D): LLaVA-1.5-7B on a GPU; small enough for the Triton interpreter on the CPU
GAP_SIZES = [(32, 576, 128, 4096), (8, 576, 64, 4096)] if ON_GPU else [(2, 24, 8, 32)]
# (B, Ni, Nt, Dv, D)
PROJ_SIZES = [(32, 576, 128, 1024, 4096)] if ON_GPU else [(2, 20, 8, 16, 32)]


def _gap_inputs(B, Ni, Nt, D):
    img = torch.randn(B, Ni, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    txt = torch.randn(B, Nt, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    tm = torch.arange(Nt, device=DEVICE)[None, :] < torch.randint(Nt // 2, Nt + 1, (B, 1), device=DEVICE)
    return img, txt, tm


@pytest.mark.parametrize("size", GAP_SIZES, ids=lambda s: "B{}-Ni{}-Nt{}-D{}".format(*s))
@pytest.mark.parametrize("backend", backend_params())
def test_gap_loss_fwd_bwd(benchmark, backend, size):
    img, txt, tm = _gap_inputs(*size)

    def step():
        loss = regap_fast.fused_gap_loss(img, txt, None, tm, backend=backend)
        return torch.autograd.grad(loss, (img, txt))

    gi, gt = benchmark(synchronized(step))
    assert gi.shape == img.shape and torch.isfinite(gt).all()


@pytest.mark.parametrize("size", GAP_SIZES[:1], ids=lambda s: "B{}-Ni{}-Nt{}-D{}".format(*s))
def test_gap_loss_eager_reference(benchmark, size):
    img, txt, tm = _gap_inputs(*size)

    def step():
        return torch.autograd.grad(regap_fast.gap_loss_reference(img, txt, None, tm), (img, txt))

    benchmark(synchronized(step))


@pytest.mark.parametrize("size", PROJ_SIZES, ids=lambda s: "B{}-Ni{}-Nt{}-Dv{}-D{}".format(*s))
@pytest.mark.parametrize("regap", ["plain", "fused"])
@pytest.mark.parametrize("backend", backend_params())
def test_projector_fwd_bwd(benchmark, backend, regap, size):
    B, Ni, Nt, Dv, D = size
    if regap == "plain" and backend != "torch":
        pytest.skip("the plain projector (no REGAP) is backend-independent: measured once")
    proj = regap_fast.FusedLlavaProjector(Dv, D, backend=backend).to(DEVICE, DTYPE)
    params = list(proj.parameters())
    x = torch.randn(B, Ni, Dv, device=DEVICE, dtype=DTYPE)
    d_out = torch.randn(B, Ni, D, device=DEVICE, dtype=DTYPE) * 1e-3
    table = torch.randn(1000, D, device=DEVICE, dtype=DTYPE)
    ids = torch.randint(0, 1000, (B, Nt), device=DEVICE)

    def step():
        if regap == "plain":
            return torch.autograd.grad(proj(x), params, d_out)
        e, gap = regap_fast.projector_gap_loss(proj, x, ids, table)
        return torch.autograd.grad((e, 0.1 * gap), params, (d_out, None))

    grads = benchmark(synchronized(step))
    assert all(torch.isfinite(g).all() for g in grads)
