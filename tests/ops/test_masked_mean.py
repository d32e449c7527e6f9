"""masked_mean: every backend against independent float64 computations; gradients; gradcheck."""

import pytest
import torch

from regap_fast import masked_mean, masked_mean_reference

from helpers import DEVICE, all_backend_params, poison_masked, random_mask, random_tokens, rel_err

BACKENDS = all_backend_params()
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 33), (2, 70, 5), (4, 9, 130)])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_mean(backend, shape, with_mask, dtype):
    B, N, D = shape
    x = random_tokens(B, N, D, dtype, DEVICE, noncontiguous=True)
    mask = random_mask(B, N, DEVICE, empty_rows=(0,) if B > 1 else ()) if with_mask else None
    x = poison_masked(x, mask).requires_grad_(True)
    out = masked_mean(x, mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, D)
    xs = x.detach().double()
    expect = torch.stack([
        (xs[b][mask[b]] if mask is not None else xs[b]).mean(0) if (mask is None or mask[b].any())
        else torch.zeros(D, dtype=torch.float64, device=DEVICE)
        for b in range(B)
    ])
    assert rel_err(out, expect) < 2e-6
    w = torch.randn(B, D, device=DEVICE)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert g.dtype == dtype and torch.isfinite(g).all()
    n = mask.sum(1) if mask is not None else torch.full((B,), N, device=DEVICE)
    m = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    expect_g = torch.where(m.unsqueeze(-1), (w / n.clamp(min=1).unsqueeze(-1)).unsqueeze(1), 0)
    assert rel_err(g, expect_g) < GRAD_TOL[dtype]


def test_masked_mean_gradcheck():
    x = torch.randn(3, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = random_mask(3, 6, DEVICE, empty_rows=(2,))
    assert torch.autograd.gradcheck(lambda a: masked_mean(a, mask, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda a: masked_mean(a, None, backend="torch"), (x,))
    assert rel_err(masked_mean(x, mask), masked_mean_reference(x, mask)) < 1e-12
