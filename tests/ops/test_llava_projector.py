"""Fused projectors and projector_gap_loss against the unfused PyTorch computation."""

import pytest
import torch
import torch.nn.functional as F

import regap_fast
from regap_fast import (FusedLinearProjector, FusedLlavaProjector, pooled_text_embeddings,
                        projector_gap_loss)

from helpers import DEVICE, all_backend_params, check_projector, projector_inputs, random_mask, rel_err, requires_gpu

BACKENDS = all_backend_params("projector")
TEXT_BACKENDS = all_backend_params("text_pool")


# (B, Ni, Nt, Dv, D): Ni not a multiple of the tile, D not a power of two, B = 1, Ni < tile
SIZES = [(1, 7, 3, 12, 20), (3, 37, 5, 24, 40), (2, 5, 4, 33, 17), (4, 9, 6, 16, 48)]


# LLaVA's MLP at every size above; the linear projector (MiniGPT-4) with 32 query tokens and an odd size
FP32_CASES = ([pytest.param(FusedLlavaProjector, size, id=f"llava-{size}") for size in SIZES]
              + [pytest.param(FusedLinearProjector, size, id=f"linear-{size}")
                 for size in [(1, 32, 5, 24, 40), (3, 7, 4, 12, 20)]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, size", FP32_CASES)
@pytest.mark.parametrize("masks", [False, True])
def test_projectors_fp32(backend, cls, size, masks):
    B, Ni, Nt, Dv, D = size
    proj = cls(Dv, D).to(DEVICE)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 50, torch.float32, masks)
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=3e-6, tol_grad=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("squared", [False, True])
def test_llava_projector_fp16(backend, squared):
    B, Ni, Nt, Dv, D = 3, 21, 7, 32, 48
    proj = FusedLlavaProjector(Dv, D).to(DEVICE).half()
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 40, torch.float16, True)
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=2e-3, tol_grad=8e-3, squared=squared)


def test_llava_projector_float64_exact():
    """In float64 (the torch backend) the fused math and the unfused one agree to rounding."""
    proj = FusedLlavaProjector(10, 14).to(DEVICE).double()
    x, ids, table, im, tm = projector_inputs(3, 6, 4, 10, 14, 30, torch.float64, True)
    check_projector(proj, x, ids, table, im, tm, "torch", tol_out=1e-13, tol_grad=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_projector_pooled_output(backend):
    """return_pooled: the masked mean of the outputs, from the epilogue-pooled hidden state."""
    proj = FusedLlavaProjector(16, 24, backend=backend).to(DEVICE)
    x = torch.randn(3, 11, 16, device=DEVICE)
    im = random_mask(3, 11, DEVICE, empty_rows=(2,))
    out, pooled = proj(x, im, return_pooled=True)
    plain = proj(x)
    assert rel_err(out, plain) < 1e-6
    expect = regap_fast.masked_mean_reference(plain.double(), im)
    assert pooled.dtype == torch.float32 and rel_err(pooled[:2], expect[:2]) < 1e-5
    # a sample with no valid token pools to b2 @ nothing: mean of nothing is 0 hidden -> the bias
    assert torch.allclose(pooled[2], proj.linear_2.bias.float(), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_projector_under_autocast(backend):
    """fp32 weights, autocast to fp16: outputs in fp16, fp32 gradients, like nn.Linear under autocast.

    (fp16, not bf16: the Triton interpreter's bf16 tl.dot is broken, see BUILD-NOTES.md.)"""
    proj = FusedLlavaProjector(16, 32, backend=backend).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, pooled = proj(x, return_pooled=True)
        plain = proj(x)
    assert out.dtype == plain.dtype == torch.float16
    assert rel_err(out, plain) < 2e-3
    (pooled.sum() + out.float().sum()).backward()
    assert proj.linear_1.weight.grad.dtype == torch.float32 and torch.isfinite(proj.linear_1.weight.grad).all()


@pytest.mark.parametrize("backend", TEXT_BACKENDS)
def test_pooled_text_embeddings(backend):
    V, D = 37, 19
    table = torch.randn(V, D, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, V, (4, 9), device=DEVICE)
    tm = random_mask(4, 9, DEVICE, empty_rows=(1,))
    out = pooled_text_embeddings(ids, table, tm, backend=backend)
    ref = regap_fast.masked_mean_reference(table.detach().double()[ids], tm)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    w = torch.randn(4, D, device=DEVICE)
    (g,) = torch.autograd.grad((out * w).sum(), table)
    (g_ref,) = torch.autograd.grad((regap_fast.masked_mean_reference(F.embedding(ids, table), tm) * w).sum(), table)
    assert rel_err(g, g_ref) < 1e-6


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


def test_linear_projector_loads_blip2_language_projection():
    """MiniGPT-4's llama_proj / BLIP-2's language_projection: an nn.Linear, loaded by stripping the prefix."""
    lin = torch.nn.Linear(16, 24)
    sd = {f"language_projection.{k}": v for k, v in lin.state_dict().items()}
    ours = FusedLinearProjector(16, 24)
    ours.load_state_dict({k.removeprefix("language_projection."): v for k, v in sd.items()})
    x = torch.randn(2, 32, 16)
    assert torch.allclose(ours(x), lin(x), atol=1e-6)


def test_projector_input_errors():
    proj = FusedLlavaProjector(8, 16)
    with pytest.raises(ValueError, match="features"):
        proj(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="shape"):
        proj(torch.randn(2, 8))
    with pytest.raises(ValueError, match="image_mask must have shape"):
        proj(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool), return_pooled=True)
    with pytest.raises(TypeError, match="FusedLlavaProjector or FusedLinearProjector"):
        projector_gap_loss(torch.nn.Linear(8, 16), torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long),
                           torch.randn(10, 16))
    with pytest.raises(TypeError, match="input_ids"):
        pooled_text_embeddings(torch.zeros(2, 3), torch.randn(5, 4))


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at LLaVA-1.5-7B shapes
# --------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda")])
def test_llava_projector_bf16_llava7b_shapes(backend):
    reason = regap_fast.backends.why_unavailable(backend, DEVICE, torch.bfloat16, "projector")
    if reason:
        pytest.skip(reason)
    B, Ni, Nt, Dv, D = 8, 576, 64, 1024, 4096
    proj = FusedLlavaProjector(Dv, D).to(DEVICE, torch.bfloat16)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 32000, torch.bfloat16, True)
    check_projector(proj, x, ids, table, im, tm, backend, tol_out=1e-2, tol_grad=2e-2)
