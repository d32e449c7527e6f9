"""``linear_projector`` / ``FusedLinearProjector`` (MiniGPT-4's llama_proj, BLIP-2's language_projection) on
every backend: against the unfused step in the same dtype and in float64, the pooled output and its
gradients (x trainable or not, masks with empty rows), autocast, state dicts."""

import pytest
import torch
import torch.nn.functional as F

from regap_fast import FusedLinearProjector, linear_projector, masked_mean_reference
from regap_fast.projector import projector_state_dict
from regap_fast.reference import linear_projector_reference

from helpers import (DEVICE, PROJECTOR_TOL, all_backend_params, check_float64_exact, check_projector,
                     check_projector_float64, check_under_autocast,
                     projector_inputs, random_mask, rel_err, tiny_blip2_generation)

BACKENDS = all_backend_params("projector")

# odd sizes: Ni = 1, D and Dv primes, B not a power of two; Ni = 32 (MiniGPT-4's query tokens)
ODD = [(5, 13, 3, 7, 11), (2, 1, 2, 3, 5), (3, 32, 9, 17, 29), (1, 32, 5, 24, 40), (3, 7, 4, 12, 20)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size, squared", [(size, squared) for size in ODD for squared in (False, True)])
def test_matches_the_unfused_step(backend, size, squared):
    B, Ni, Nt, Dv, D = size
    proj = FusedLinearProjector(Dv, D).to(DEVICE)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 40, torch.float32, True)
    if B > 2:
        im[1] = False  # a sample with no valid image token: counted out, no gradient
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=3e-6, tol_grad=3e-5, squared=squared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(backend, dtype, bias):
    B, Ni, Nt, Dv, D = 3, 32, 7, 24, 40
    proj = FusedLinearProjector(Dv, D, bias=bias).to(DEVICE, dtype)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 40, dtype, True)
    check_projector_float64(proj, x, ids, table, im, tm, backend, *PROJECTOR_TOL[dtype])


def test_float64_exact():
    check_float64_exact(FusedLinearProjector)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooled_output_and_its_gradients(backend):
    """return_pooled: outputs exactly nn.Linear's; pooled = masked mean of the outputs (fp32), computed as
    masked_mean(x) @ W^T + b; the gradients of W, b and x through the pooled output match autograd
    through the materialised outputs."""
    proj = FusedLinearProjector(16, 24, backend=backend).to(DEVICE)
    lin = torch.nn.Linear(16, 24).to(DEVICE)
    lin.load_state_dict(proj.state_dict())
    x = torch.randn(4, 11, 16, device=DEVICE, requires_grad=True)
    im = random_mask(4, 11, DEVICE, empty_rows=(2,))
    out, pooled = proj(x, im, return_pooled=True)
    torch.testing.assert_close(out, lin(x), rtol=0, atol=0)
    assert pooled.dtype == torch.float32 and pooled.shape == (4, 24)
    _, expect = linear_projector_reference(x.double(), proj.weight.double(), proj.bias.double(), im)
    assert rel_err(pooled[[0, 1, 3]], expect[[0, 1, 3]]) < 1e-6
    torch.testing.assert_close(pooled[2], proj.bias.float())  # mean of nothing: 0 @ W^T + b
    w = torch.randn(4, 24, device=DEVICE)
    w[2] = 0  # (the empty row's pooled value is a convention, not a mean: leave it out of the loss)
    probe = torch.randn(4, 11, 24, device=DEVICE)
    params = [proj.weight, proj.bias, x]
    got = torch.autograd.grad((pooled * w).sum() + (out * probe).sum(), params)
    ref_out = F.linear(x, proj.weight, proj.bias)
    ref_pooled = masked_mean_reference(ref_out, im).float()
    want = torch.autograd.grad((ref_pooled * w).sum() + (ref_out * probe).sum(), params)
    for name, g, r in zip(("weight", "bias", "x"), got, want):
        assert rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_pooled_output_used(backend):
    """A loss on the pooled output alone (the outputs' gradient is None) still gives W, b and x theirs."""
    w, b = torch.randn(12, 7, device=DEVICE, requires_grad=True), torch.randn(12, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 5, 7, device=DEVICE, requires_grad=True)
    _, pooled = linear_projector(x, w, b, backend=backend)
    probe = torch.randn(3, 12, device=DEVICE)
    got = torch.autograd.grad((pooled * probe).sum(), (x, w, b))
    r = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    want = torch.autograd.grad((linear_projector_reference(*r)[1] * probe.double()).sum(), r)
    for g, ref in zip(got, want):
        assert rel_err(g, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast(backend):
    check_under_autocast(FusedLinearProjector(16, 32, backend=backend).to(DEVICE))


# --------------------------------------------------------------------------------------------------
# drop-in compatibility: state dicts
# --------------------------------------------------------------------------------------------------


def test_loads_blip2_language_projection_names():
    """MiniGPT-4's llama_proj / BLIP-2's language_projection: an nn.Linear, loaded by stripping the prefix."""
    lin = torch.nn.Linear(16, 24)
    sd = {f"language_projection.{k}": v for k, v in lin.state_dict().items()}
    ours = FusedLinearProjector(16, 24)
    ours.load_state_dict({k.removeprefix("language_projection."): v for k, v in sd.items()})
    x = torch.randn(2, 32, 16)
    assert torch.allclose(ours(x), lin(x), atol=1e-6)


def test_state_dict_round_trip_with_blip2_language_projection():
    """BLIP-2's language_projection (Blip2ForConditionalGeneration, tiny config) <-> FusedLinearProjector."""
    torch.manual_seed(0)
    blip2 = tiny_blip2_generation()
    hf = blip2.language_projection
    ours = FusedLinearProjector(hf.in_features, hf.out_features)
    ours.load_state_dict(projector_state_dict(blip2.state_dict()))  # the prefix found and stripped
    x = torch.randn(2, 3, hf.in_features)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)
    with torch.no_grad():
        ours.weight.mul_(2)
    hf.load_state_dict(ours.state_dict())  # and back
    torch.testing.assert_close(hf(x), ours(x), rtol=0, atol=0)
    assert set(ours.state_dict()) == {"weight", "bias"}


def test_projector_state_dict_finds_the_known_prefixes():
    w, b = torch.randn(4, 3), torch.randn(4)
    assert set(projector_state_dict({"llama_proj.weight": w, "llama_proj.bias": b, "other.x": w})) == {"weight", "bias"}
    sd = projector_state_dict({"model.mm_projector.0.weight": w, "model.mm_projector.2.bias": b,
                               "model.layers.0.weight": w})
    assert set(sd) == {"0.weight", "2.bias"}
    assert projector_state_dict({"module.language_projection.weight": w})["weight"] is w
    with pytest.raises(KeyError, match="no projector weights"):
        projector_state_dict({"encoder.weight": w})
    with pytest.raises(KeyError, match="several projectors"):
        projector_state_dict({"a.llama_proj.weight": w, "b.llama_proj.weight": w})
