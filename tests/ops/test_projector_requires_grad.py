"""The projector ops' backward for every requires_grad pattern of their inputs (issue 30): LoRA on the
language model (projector frozen), a frozen projector with a trainable vision tower, frozen biases,
``enable_input_require_grads``. Every pattern of (x, w1, b1, w2, b2) for ``llava_projector`` and of
(x, w, b) for ``linear_projector``, each backend, both outputs reaching the loss, against float64 autograd.
"""

import itertools

import pytest
import torch

from regap_fast import linear_projector, llava_projector
from regap_fast.reference import linear_projector_reference, llava_projector_reference

from helpers import DEVICE, all_backend_params, random_mask, rel_err

BACKENDS = all_backend_params("projector")
USES = [("out", "pooled"), ("out",), ("pooled",)]  # one output alone: the other's gradient is None


def _check_pattern(op, reference, tensors, pattern, backend, uses):
    """Run ``op`` with exactly the tensors of ``pattern`` requiring grad; compare every gradient with
    float64 autograd on the same values. ``uses``: which outputs reach the loss ("out", "pooled")."""
    B, n = tensors[0].shape[:2]
    im = random_mask(B, n, DEVICE, p=0.7)
    im[:, 0], im[1] = True, False  # sample 1 empty, every other one not
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(tensors, pattern)]
    out, pooled = op(*leaves, im, backend=backend)
    probe_out, probe_pooled = torch.randn_like(out), torch.randn_like(pooled)
    probe_pooled[1] = 0  # the empty sample pools to the bias by convention, not by a mean
    probe_out, probe_pooled = probe_out * ("out" in uses), probe_pooled * ("pooled" in uses)
    wanted = [t for t in leaves if t.requires_grad]
    if not wanted:
        assert not out.requires_grad and not pooled.requires_grad
        return
    loss = sum((t * p).sum() for t, p, use in ((out, probe_out, "out"), (pooled, probe_pooled, "pooled"))
               if use in uses)
    got = torch.autograd.grad(loss, wanted)

    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    r_out, r_pooled = reference(*ref, image_mask=im)
    want = torch.autograd.grad((r_out * probe_out.double()).sum() + (r_pooled * probe_pooled.double()).sum(),
                               [t for t in ref if t.requires_grad])
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < 3e-5, (pattern, uses, rel_err(g, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_projector_every_requires_grad_pattern(backend):
    B, n, Dv, D = 3, 5, 6, 10
    tensors = (torch.randn(B, n, Dv, device=DEVICE), torch.randn(D, Dv, device=DEVICE) / 2,
               torch.randn(D, device=DEVICE), torch.randn(D, D, device=DEVICE) / 3, torch.randn(D, device=DEVICE))
    for pattern in itertools.product((False, True), repeat=5):
        for uses in USES:
            _check_pattern(llava_projector, llava_projector_reference, tensors, pattern, backend, uses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_projector_every_requires_grad_pattern(backend):
    B, n, K, D = 3, 5, 6, 10
    tensors = (torch.randn(B, n, K, device=DEVICE), torch.randn(D, K, device=DEVICE) / 2,
               torch.randn(D, device=DEVICE))
    for pattern in itertools.product((False, True), repeat=3):
        for uses in USES:
            _check_pattern(linear_projector, linear_projector_reference, tensors, pattern, backend, uses)
