"""``llava_projector`` / ``FusedLlavaProjector`` (LLaVA-1.5's mlp2x_gelu) on every backend: against the
unfused step in the same dtype and in float64, the pooled output, autocast, state dicts, errors."""

import pytest
import torch
import torch.nn.functional as F

import regap_fast
from regap_fast import FusedLlavaProjector, llava_projector, projector_gap_loss
from regap_fast.reference import llava_projector_reference

from helpers import (DEVICE, PROJECTOR_TOL, all_backend_params, check_float64_exact, check_projector,
                     check_projector_float64, check_under_autocast,
                     projector_inputs, random_mask, rel_err, requires_gpu)

BACKENDS = all_backend_params("projector")

# (B, Ni, Nt, Dv, D): Ni not a multiple of any tile, D not a power of two, B = 1, Ni = 1
SIZES = [(1, 7, 3, 12, 20), (3, 37, 5, 24, 40), (2, 5, 4, 33, 17), (4, 9, 6, 16, 48), (3, 1, 2, 8, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masks", [False, True])
def test_matches_the_unfused_step(backend, size, masks):
    B, Ni, Nt, Dv, D = size
    proj = FusedLlavaProjector(Dv, D).to(DEVICE)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 50, torch.float32, masks)
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=3e-6, tol_grad=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("squared", [False, True])
def test_matches_float64(backend, dtype, squared):
    B, Ni, Nt, Dv, D = 3, 21, 7, 32, 48
    proj = FusedLlavaProjector(Dv, D).to(DEVICE, dtype)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 40, dtype, True)
    tol_out, tol_grad = PROJECTOR_TOL[dtype]
    check_projector_float64(proj, x, ids, table, im, tm, backend, tol_out, tol_grad, squared=squared)


def test_float64_exact():
    check_float64_exact(FusedLlavaProjector)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooled_output(backend):
    """return_pooled: the plain outputs and the masked mean of them; an empty sample pools to b2."""
    proj = FusedLlavaProjector(16, 24, backend=backend).to(DEVICE)
    x = torch.randn(3, 11, 16, device=DEVICE)
    im = random_mask(3, 11, DEVICE, empty_rows=(2,))
    out, pooled = proj(x, im, return_pooled=True)
    plain = proj(x)
    assert rel_err(out, plain) < 1e-6
    args = [p.double() for p in (proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight, proj.linear_2.bias)]
    _, expect = llava_projector_reference(x.double(), *args, image_mask=im)
    assert pooled.dtype == torch.float32 and rel_err(pooled[:2], expect[:2]) < 1e-5
    assert torch.allclose(pooled[2], proj.linear_2.bias.float(), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_functional_gradients_of_each_output_alone(backend, bias):
    """llava_projector's gradients when only `out` or only `pooled` reaches the loss (the other's
    gradient is None), without biases, x with and without requires_grad, against float64 autograd."""
    B, n, Dv, D = 3, 13, 12, 20
    w1, w2 = torch.randn(D, Dv, device=DEVICE) / 4, torch.randn(D, D, device=DEVICE) / 5
    b1, b2 = (torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)) if bias else (None, None)
    params = [t for t in (w1, b1, w2, b2) if t is not None]
    for t in params:
        t.requires_grad_(True)
    im = random_mask(B, n, DEVICE, empty_rows=(1,))
    for use in ("out", "pooled"):
        for x_grad in (False, True):
            x = torch.randn(B, n, Dv, device=DEVICE, requires_grad=x_grad)
            out, pooled = llava_projector(x, w1, b1, w2, b2, im, backend=backend)
            probe = torch.randn_like(out if use == "out" else pooled)
            if use == "pooled":  # the empty sample's pooled value (b2) is a convention, not a mean
                probe[1] = 0
            inputs = params + ([x] if x_grad else [])
            got = torch.autograd.grad(((out if use == "out" else pooled) * probe).sum(), inputs)
            ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
            ref = dict(zip([id(t) for t in inputs], ref_inputs))
            r = [ref.get(id(t), None if t is None else t.double()) for t in (x, w1, b1, w2, b2)]
            r_out, r_pooled = llava_projector_reference(*r, image_mask=im)
            want = torch.autograd.grad(((r_out if use == "out" else r_pooled) * probe.double()).sum(), ref_inputs)
            for g, w in zip(got, want):
                assert rel_err(g, w) < 3e-5, (use, x_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast(backend):
    check_under_autocast(FusedLlavaProjector(16, 32, backend=backend).to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    proj = FusedLlavaProjector(16, 40, backend=backend).to(DEVICE, torch.bfloat16)
    x, ids, table, im, tm = projector_inputs(3, 37, 5, 16, 40, 50, torch.bfloat16, True)

    def step():
        e, gap = projector_gap_loss(proj, x, ids, table, im, tm)
        return (e, gap, *torch.autograd.grad(e.float().sum() + gap, list(proj.parameters()) + [x]))

    assert all(torch.equal(a, b) for a, b in zip(step(), step()))


# --------------------------------------------------------------------------------------------------
# drop-in compatibility: state dicts
# --------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_with_transformers_llava_projector():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=LlamaConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=64),
                      projector_hidden_act="gelu")
    hf = LlavaMultiModalProjector(cfg).eval()
    ours = FusedLlavaProjector(24, 40)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 24)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)
    hf2 = LlavaMultiModalProjector(cfg)
    hf2.load_state_dict(ours.state_dict())
    assert torch.allclose(hf2(x), ours(x), atol=1e-6)


def test_state_dict_round_trip_with_llava_mm_projector_names():
    seq = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 20))
    ours = FusedLlavaProjector(12, 20)
    ours.load_state_dict(seq.state_dict())  # keys "0.weight", "2.bias", ...
    x = torch.randn(2, 3, 12)
    assert torch.allclose(ours(x), seq(x), atol=1e-6)
    sd = ours.llava_state_dict()
    assert set(sd) == {f"model.mm_projector.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    seq2 = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 20))
    seq2.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in sd.items()})
    assert torch.allclose(seq2(x), seq(x), atol=1e-6)


def test_input_errors():
    proj = FusedLlavaProjector(8, 16)
    with pytest.raises(ValueError, match="features"):
        proj(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="shape"):
        proj(torch.randn(2, 8))
    with pytest.raises(ValueError, match="image_mask must have shape"):
        proj(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool), return_pooled=True)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        proj(torch.ones(2, 3, 8, dtype=torch.long), return_pooled=True)
    with pytest.raises(TypeError, match="FusedLlavaProjector or FusedLinearProjector"):
        projector_gap_loss(torch.nn.Linear(8, 16), torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long),
                           torch.randn(10, 16))
    with pytest.raises(ValueError, match="caption_ids must have shape"):
        projector_gap_loss(proj, torch.randn(2, 3, 8), torch.zeros(3, 4, dtype=torch.long), torch.randn(10, 16))


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at LLaVA-1.5-7B shapes
# --------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_bf16_llava7b_shapes(backend):
    reason = regap_fast.backends.why_unavailable(backend, DEVICE, torch.bfloat16, "projector")
    if reason:
        pytest.skip(reason)
    B, Ni, Nt, Dv, D = 8, 576, 64, 1024, 4096
    proj = FusedLlavaProjector(Dv, D).to(DEVICE, torch.bfloat16)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 32000, torch.bfloat16, True)
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=1e-2, tol_grad=2e-2)
    F.gelu(x)  # the inputs are left untouched by the step
