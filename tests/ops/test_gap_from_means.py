"""gap_from_means (the gap from pooled [B, D] sides: what the fused projectors' pooled outputs meet) on
every backend against independent float64 computations, valid flags, gradients, errors."""

import pytest
import torch

from regap_fast import gap_from_means, gap_from_means_reference

from helpers import DEVICE, all_backend_params, rel_err

BACKENDS = all_backend_params()


def _float64(mu_i, mu_t, valid, reduction, squared):
    """One sample at a time, in float64."""
    gaps = []
    for b in range(mu_i.shape[0]):
        d = mu_i[b].double() - mu_t[b].double()
        ok = valid is None or bool(valid[b])
        g = ((d * d).sum() if squared else torch.linalg.vector_norm(d)) if ok else d.new_zeros(())
        gaps.append(g)
    gaps = torch.stack(gaps)
    n = mu_i.shape[0] if valid is None else int(valid.sum())
    return {"none": gaps, "sum": gaps.sum(), "mean": gaps.sum() / max(n, 1)}[reduction]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_matches_float64(backend, reduction, squared, with_valid):
    B, D = 5, 37
    mu_i = torch.randn(D, B, device=DEVICE).t().requires_grad_(True)  # a transposed view
    mu_t = (torch.randn(B, D, device=DEVICE) + 0.3).requires_grad_(True)
    valid = torch.tensor([True, False, True, True, False], device=DEVICE) if with_valid else None
    loss = gap_from_means(mu_i, mu_t, valid, reduction=reduction, squared=squared, backend=backend)
    r_i, r_t = (t.detach().double().requires_grad_(True) for t in (mu_i, mu_t))
    ref = _float64(r_i, r_t, valid, reduction, squared)
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < 2e-6
    w = torch.rand_like(ref) + 0.5
    gi, gt = torch.autograd.grad((loss * w.float()).sum(), (mu_i, mu_t))
    ri, rt = torch.autograd.grad((ref * w).sum(), (r_i, r_t))
    assert rel_err(gi, ri) < 2e-6 and rel_err(gt, rt) < 2e-6
    if with_valid:  # left-out samples: zero gradient
        assert gi[[1, 4]].abs().max() == 0 and gt[[1, 4]].abs().max() == 0


def test_reference_and_gradcheck():
    mu_i = torch.randn(4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mu_t = torch.randn(4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    valid = torch.tensor([True, True, False, True], device=DEVICE)
    for squared in (False, True):
        f = lambda a, b: gap_from_means(a, b, valid, squared=squared, backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(f, (mu_i, mu_t))
        assert rel_err(f(mu_i, mu_t), gap_from_means_reference(mu_i, mu_t, valid, squared=squared)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gap_zero_gradient(backend):
    mu = torch.randn(3, 8, device=DEVICE)
    a, b = mu.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    loss = gap_from_means(a, b, backend=backend)
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert loss.item() == 0 and ga.abs().max() == 0 and gb.abs().max() == 0


def test_errors():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        gap_from_means(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        gap_from_means(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="valid must be"):
        gap_from_means(torch.randn(2, 4), torch.randn(2, 4), torch.ones(2))
