"""The GPU pass: every kernel of every backend once, quickly (`pytest -m gpu`; sized for two minutes).

One odd-sized case per kernel family, dtype and mask setting, forward and backward, against
independent float64 computations or the unfused PyTorch step; the exhaustive sweeps live in the
other modules (they run on the CPU through the Triton interpreter, and on a GPU when asked for).
Skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from regap_fast import (FusedLinearProjector, FusedLlavaProjector, backends, fused_gap_loss, llava_projector,
                        masked_mean, pooled_text_embeddings)

from helpers import (DEVICE, check_projector_float64, loss_float64, poison_masked, projector_inputs, random_mask,
                     random_tokens, rel_err, requires_gpu)

pytestmark = [pytest.mark.gpu, requires_gpu]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the output's rounding sets the tolerance of everything returned in the input dtype
TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def kernel_backends(family):
    """The kernel backends that run here (an empty list skips the test: pytest's empty parameter set)."""
    return [b for b in ("triton", "cuda") if not backends.why_unavailable(b, DEVICE, torch.float32, family)]


@pytest.mark.parametrize("backend", kernel_backends("gap_loss"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
def test_gap_loss(backend, dtype, masks):
    B, Ni, Nt, D = 5, 37, 19, 200
    img = random_tokens(B, Ni, D, dtype, DEVICE, noncontiguous=masks)
    txt = random_tokens(B, Nt, D, dtype, DEVICE) + 0.5
    im = random_mask(B, Ni, DEVICE, empty_rows=(1,)) if masks else None
    tm = random_mask(B, Nt, DEVICE, empty_rows=(3,)) if masks else None
    img, txt = poison_masked(img, im).requires_grad_(True), poison_masked(txt, tm).requires_grad_(True)
    loss = fused_gap_loss(img, txt, im, tm, backend=backend)
    gi, gt = torch.autograd.grad(loss, (img, txt))

    clean = lambda x, m: x.detach().double() if m is None else torch.where(m[..., None], x.detach().double(), 0)  # noqa: E731
    ri = clean(img, im).requires_grad_(True)
    rt = clean(txt, tm).requires_grad_(True)
    ref = loss_float64(ri, rt, im, tm)
    ri_g, rt_g = torch.autograd.grad(ref, (ri, rt))
    assert abs(loss.item() - ref.item()) <= 2e-5 * abs(ref.item())
    for got, want, mask in ((gi, ri_g, im), (gt, rt_g, tm)):
        got = got.double() if mask is None else torch.where(mask[..., None], got.double(), 0)
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends("gap_loss"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gap_and_masked_mean(backend, dtype):
    rows = (torch.randint(-24, 25, (2, 1, 72), device=DEVICE) / 4).to(dtype)
    img = rows.expand(2, 7, 72).clone().requires_grad_(True)
    txt = rows.expand(2, 11, 72).clone().requires_grad_(True)
    loss = fused_gap_loss(img, txt, backend=backend)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    assert loss.item() == 0 and gi.abs().max().item() == 0 and gt.abs().max().item() == 0
    assert torch.equal(masked_mean(img.detach(), backend=backend), rows[:, 0].float())


@pytest.mark.parametrize("backend", kernel_backends("text_pool"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_pooled_text_embeddings(backend, dtype):
    B, Nt, V, D = 3, 23, 61, 136
    ids = torch.randint(0, V, (B, Nt), device=DEVICE)
    mask = random_mask(B, Nt, DEVICE, empty_rows=(2,))
    table = torch.randn(V, D, device=DEVICE, dtype=dtype).requires_grad_(True)
    probe = torch.randn(B, D, device=DEVICE)
    got = pooled_text_embeddings(ids, table, mask, backend=backend)
    (g,) = torch.autograd.grad((got * probe).sum(), table)
    t64 = table.detach().double().requires_grad_(True)
    emb = F.embedding(ids, t64)
    ref = torch.where(mask[..., None], emb, 0).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    (g_ref,) = torch.autograd.grad((ref * probe.double()).sum(), t64)
    assert rel_err(got, ref) < 2e-6
    assert rel_err(g, g_ref) < TOL[dtype]


PROJECTOR_TOL = {torch.float32: (3e-6, 3e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 6e-2)}


@pytest.mark.parametrize("kind", ["llava", "linear"])
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("projector"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
def test_projectors(kind, backend, dtype, masks):
    """LLaVA's MLP (cuBLAS GEMMs + the GELU/dGELU passes, hi/lo pooled GEMM) and MiniGPT-4's linear layer,
    against the unfused step in float64."""
    B, Ni, Nt, Dv, D = 3, 37, 5, 24, 40
    cls = FusedLlavaProjector if kind == "llava" else FusedLinearProjector
    proj = cls(Dv, D).to(DEVICE, dtype)
    x, ids, table, im, tm = projector_inputs(B, Ni, Nt, Dv, D, 50, dtype, masks)
    tol_out, tol_grad = PROJECTOR_TOL[dtype]
    check_projector_float64(proj, x, ids, table, im, tm, backend, tol_out=tol_out, tol_grad=tol_grad)


@pytest.mark.parametrize("backend", kernel_backends("projector"))
def test_projector_torch_compile_fullgraph(backend):
    x = torch.randn(3, 17, 24, device=DEVICE, dtype=torch.bfloat16)
    w1, w2 = (torch.randn(40, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for k in (24, 40))
    step = lambda x, a, b: sum(t.float().square().sum() for t in llava_projector(x, a, None, b, None, backend=backend))  # noqa: E731
    got = torch.compile(step, fullgraph=True)(x, w1, w2)
    want = step(x, w1, w2)
    assert torch.allclose(got, want, rtol=1e-3)
    grads = zip(torch.autograd.grad(got, (w1, w2)), torch.autograd.grad(want, (w1, w2)))
    assert all(rel_err(a, b) < 1e-2 for a, b in grads)


@pytest.mark.parametrize("backend", kernel_backends("gap_loss"))
def test_torch_compile_fullgraph(backend):
    img = torch.randn(4, 9, 64, device=DEVICE, requires_grad=True)
    txt = torch.randn(4, 5, 64, device=DEVICE, requires_grad=True)
    tm = random_mask(4, 5, DEVICE)
    compiled = torch.compile(lambda i, t, m: fused_gap_loss(i, t, None, m, backend=backend), fullgraph=True)
    got = compiled(img, txt, tm)
    want = fused_gap_loss(img, txt, None, tm, backend=backend)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    g1 = torch.autograd.grad(got, (img, txt))
    g2 = torch.autograd.grad(want, (img, txt))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(g1, g2))
