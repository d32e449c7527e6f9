"""fused_gap_loss: every backend against independent float64 computations, gradients, errors."""

import sys

import pytest
import torch

from regap_fast import backends, fused_gap_loss, gap_loss_reference, masked_mean

from helpers import DEVICE, all_backend_params, loss_float64, poison_masked, random_mask, random_tokens, rel_err

BACKENDS = all_backend_params()

# (B, Ni, Nt, D): odd sizes, sizes that are not multiples of any block, D = 1, Ni = 1
SHAPES = [(1, 1, 1, 1), (2, 5, 3, 7), (3, 33, 17, 70), (4, 1, 9, 130), (2, 40, 65, 1), (5, 64, 32, 96)]

TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
# gradients are returned in the input dtype: their rounding sets the tolerance
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def _inputs(shape, dtype, masks, noncontig, empty_rows=()):
    B, Ni, Nt, D = shape
    img = random_tokens(B, Ni, D, dtype, DEVICE, noncontig)
    txt = random_tokens(B, Nt, D, dtype, DEVICE, noncontig) + 0.5  # keep gaps away from 0
    im = random_mask(B, Ni, DEVICE, empty_rows=empty_rows) if masks in ("image", "both") else None
    tm = random_mask(B, Nt, DEVICE, empty_rows=empty_rows) if masks in ("text", "both") else None
    return img, txt, im, tm


def _check_forward_backward(backend, shape, dtype, masks, noncontig, reduction, squared, empty_rows=()):
    img, txt, im, tm = _inputs(shape, dtype, masks, noncontig, empty_rows)
    img, txt = poison_masked(img, im), poison_masked(txt, tm)  # padding must never be read
    img.requires_grad_(True)
    txt.requires_grad_(True)
    loss = fused_gap_loss(img, txt, im, tm, reduction=reduction, squared=squared, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    # float64 reference on the very same values (padding zeroed: the reference may not read it either)
    ri = torch.where(im.unsqueeze(-1), img, 0).detach().double() if im is not None else img.detach().double()
    rt = torch.where(tm.unsqueeze(-1), txt, 0).detach().double() if tm is not None else txt.detach().double()
    ri.requires_grad_(True)
    rt.requires_grad_(True)
    ref = loss_float64(ri, rt, im, tm, reduction, squared)
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref) < TOL[dtype], (loss, ref)

    w = torch.rand_like(ref) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    gi, gt = torch.autograd.grad((loss * w.to(loss)).sum(), (img, txt))
    if ref.requires_grad:
        ri_g, rt_g = torch.autograd.grad((ref * w.to(DEVICE)).sum(), (ri, rt), allow_unused=True)
    else:  # no sample has both sides: the loss is a constant 0
        ri_g = rt_g = None
    ri_g = torch.zeros_like(ri) if ri_g is None else ri_g
    rt_g = torch.zeros_like(rt) if rt_g is None else rt_g
    assert gi.shape == img.shape and gt.shape == txt.shape
    assert gi.dtype == dtype and gt.dtype == dtype
    for g, r in ((gi, ri_g), (gt, rt_g)):
        assert torch.isfinite(g).all()
        if r.norm() == 0:
            assert g.float().abs().max() == 0
        else:
            assert rel_err(g, r) < GRAD_TOL[dtype], rel_err(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masks", ["none", "text", "both"])
def test_matches_float64(backend, shape, masks):
    _check_forward_backward(backend, shape, torch.float32, masks, noncontig=False, reduction="mean", squared=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("squared", [False, True])
def test_reductions_and_squared(backend, reduction, squared):
    _check_forward_backward(backend, (3, 19, 11, 45), torch.float32, "both", noncontig=False,
                            reduction=reduction, squared=squared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_noncontiguous(backend, dtype):
    _check_forward_backward(backend, (3, 21, 10, 37), dtype, "both", noncontig=True, reduction="mean", squared=False)
    _check_forward_backward(backend, (2, 8, 5, 24), dtype, "none", noncontig=True, reduction="sum", squared=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_rows_are_left_out(backend, reduction):
    """A sample with no image (row 1) or no caption (row 3) token: not counted, zero gradient."""
    B, Ni, Nt, D = 5, 12, 9, 20
    img, txt, _, _ = _inputs((B, Ni, Nt, D), torch.float32, "none", False)
    im = random_mask(B, Ni, DEVICE, p=0.8)
    tm = random_mask(B, Nt, DEVICE, p=0.8)
    im[0] = True
    tm[0] = True
    im[1] = False
    tm[3] = False
    _check_forward_backward(backend, (B, Ni, Nt, D), torch.float32, "both", False, reduction, False,
                            empty_rows=())
    img = img.requires_grad_(True)
    txt = txt.requires_grad_(True)
    per = fused_gap_loss(img, txt, im, tm, reduction="none", backend=backend)
    assert per[1] == 0 and per[3] == 0 and (per[[0, 2, 4]] > 0).all()
    loss = fused_gap_loss(img, txt, im, tm, reduction=reduction, backend=backend)
    if reduction == "mean":
        assert torch.allclose(loss, per[[0, 2, 4]].mean(), rtol=1e-5)
    gi, gt = torch.autograd.grad(loss.sum(), (img, txt))
    for b in (1, 3):
        assert gi[b].abs().max() == 0 and gt[b].abs().max() == 0
    assert gi[0].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_samples_empty_gives_zero_not_nan(backend):
    img, txt, _, _ = _inputs((3, 4, 5, 8), torch.float32, "none", False)
    im = torch.zeros(3, 4, dtype=torch.bool, device=DEVICE)
    img.requires_grad_(True)
    loss = fused_gap_loss(img, txt, im, None, backend=backend)
    (g,) = torch.autograd.grad(loss, img)
    assert loss.item() == 0 and torch.isfinite(g).all() and g.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("squared", [False, True])
def test_zero_gap_has_zero_gradient(backend, squared):
    x = torch.randn(2, 6, 16, device=DEVICE)
    img = x.clone().requires_grad_(True)
    txt = x.clone().requires_grad_(True)
    loss = fused_gap_loss(img, txt, backend=backend, squared=squared)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    assert loss.item() == 0
    assert torch.isfinite(gi).all() and torch.isfinite(gt).all()
    assert gi.abs().max() == 0 and gt.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [(3, 5), (7, 11), (576, 37)])
def test_equal_means_over_coprime_counts_give_exactly_zero(backend, dtype, counts):
    """Equal means over counts that do not divide each other: the means must be formed as s / n
    (correctly rounded), not s * (1/n) (21 * fl(1/7) != 3 in fp32), or a zero gap keeps a gradient.
    Values are multiples of 1/4, so every sum is exact in fp32 and the true means are equal."""
    n_img, n_txt = counts
    D = 40
    rows = (torch.randint(-24, 25, (2, 1, D), device=DEVICE) / 4).to(dtype)
    img = rows.expand(2, n_img, D).clone().requires_grad_(True)
    txt = rows.expand(2, n_txt, D).clone().requires_grad_(True)
    loss = fused_gap_loss(img, txt, backend=backend)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    assert loss.item() == 0
    assert gi.abs().max().item() == 0 and gt.abs().max().item() == 0
    assert torch.equal(masked_mean(img.detach(), backend=backend), rows[:, 0].float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_where_required(backend):
    """Stage 1: the caption embeddings come from a frozen table and need no gradient."""
    img, txt, im, tm = _inputs((2, 7, 5, 12), torch.float32, "both", False)
    img.requires_grad_(True)
    loss = fused_gap_loss(img, txt, im, tm, backend=backend)
    (gi,) = torch.autograd.grad(loss, img)
    assert gi.shape == img.shape and gi.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_gradient_is_an_expanded_vector(backend):
    """Without a mask the gradient is one vector per sample broadcast (stride 0): no dense pass."""
    img, txt, _, tm = _inputs((3, 10, 6, 16), torch.float32, "text", False)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    gi, gt = torch.autograd.grad(fused_gap_loss(img, txt, None, tm, backend=backend), (img, txt))
    assert gi.stride(1) == 0
    assert gt.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    img, txt, im, tm = _inputs((4, 23, 13, 50), torch.float32, "both", False)
    ref = fused_gap_loss(img, txt, im, tm, reduction="none", backend="torch")
    out = fused_gap_loss(img, txt, im, tm, reduction="none", backend=backend)
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("squared", [False, True])
def test_reference_matches_independent_float64(reduction, squared):
    img, txt, im, tm = _inputs((4, 9, 7, 11), torch.float64, "both", False, empty_rows=(2,))
    ref = gap_loss_reference(img, txt, im, tm, reduction=reduction, squared=squared)
    assert rel_err(ref, loss_float64(img, txt, im, tm, reduction, squared)) < 1e-12


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("fn", ["reference", "op"])
def test_gradcheck(squared, fn):
    """gradcheck on the reference and on the custom op's torch backend, masks with empty rows."""
    img = torch.randn(3, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    txt = (torch.randn(3, 4, 4, dtype=torch.float64, device=DEVICE) + 0.3).requires_grad_(True)
    im = random_mask(3, 5, DEVICE, empty_rows=(1,))
    tm = random_mask(3, 4, DEVICE)
    tm[:, 0] = True
    for reduction in ("mean", "sum", "none"):
        if fn == "reference":
            f = lambda a, b: gap_loss_reference(a, b, im, tm, reduction=reduction, squared=squared)  # noqa: E731
        else:
            f = lambda a, b: fused_gap_loss(a, b, im, tm, reduction=reduction, squared=squared,  # noqa: E731
                                            backend="torch")
        assert torch.autograd.gradcheck(f, (img, txt))
        if fn == "reference":  # the op's backward is itself not differentiable (not needed)
            assert torch.autograd.gradgradcheck(f, (img, txt))


# --------------------------------------------------------------------------------------------------
# errors, raised before any kernel launch
# --------------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 3, 4), torch.randn(2, 5, 4)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda i, t: ((i[0], t), {}), ValueError, "shape \\[B, N, D\\]"),
        (lambda i, t: ((i, t[:1]), {}), ValueError, "batch sizes differ"),
        (lambda i, t: ((i, t[..., :3]), {}), ValueError, "embedding sizes differ"),
        (lambda i, t: ((i, t.half()), {}), TypeError, "same dtype"),
        (lambda i, t: ((i.long(), t.long()), {}), TypeError, "float16, bfloat16, float32 or float64"),
        (lambda i, t: ((i, t, torch.ones(2, 4, dtype=torch.bool)), {}), ValueError, "image_mask must have shape"),
        (lambda i, t: ((i, t, None, torch.ones(2, 5)), {}), TypeError, "caption_mask must be a bool"),
        (lambda i, t: ((i, t, None, torch.ones(2, 5, dtype=torch.long)), {}), TypeError, "bool"),
        (lambda i, t: ((i, t), {"reduction": "avg"}), ValueError, "unknown reduction"),
        (lambda i, t: ((i, t), {"backend": "jax"}), ValueError, "unknown backend"),
        (lambda i, t: ((i.numpy(), t), {}), TypeError, "must be a torch.Tensor"),
        (lambda i, t: ((i[:0], t[:0]), {}), ValueError, "non-empty"),
    ],
)
def test_errors(make, exc, match):
    args, kwargs = make(*_ok())
    with pytest.raises(exc, match=match):
        fused_gap_loss(*args, **kwargs)


def test_error_cuda_backend_on_cpu_tensors():
    i, t = _ok()
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        fused_gap_loss(i, t, backend="cuda")


def test_error_cuda_backend_on_cpu_tensors_without_extension(monkeypatch):
    """A pure-Python install (no regap_fast._C): the device is still what the message names."""
    monkeypatch.setitem(sys.modules, "regap_fast._C", None)  # import regap_fast._C now raises ImportError
    backends.clear_cache()
    try:
        i, t = _ok()
        with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
            fused_gap_loss(i, t, backend="cuda")
        assert "not built" in backends.why_unavailable("cuda", torch.device("cuda"), torch.float32)
    finally:
        backends.clear_cache()


def test_error_kernel_backend_float64():
    i, t = _ok()
    with pytest.raises(ValueError, match="use backend='torch'"):
        fused_gap_loss(i.double(), t.double(), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_error_tensors_on_different_devices():
    i, t = _ok()
    with pytest.raises(ValueError, match="is on"):
        fused_gap_loss(i.cuda(), t)
    with pytest.raises(ValueError, match="is on"):
        fused_gap_loss(i.cuda(), t.cuda(), torch.ones(2, 3, dtype=torch.bool))


def test_error_triton_on_cpu_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET the Triton backend refuses CPU tensors with a clear message."""
    mod = pytest.importorskip("regap_fast.kernels.gap_loss")
    monkeypatch.setattr(mod, "INTERPRETED", False)
    i, t = _ok()
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        fused_gap_loss(i, t, backend="triton")
