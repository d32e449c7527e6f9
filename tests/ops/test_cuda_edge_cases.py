"""The cuda backend's primitives against the torch backend's on edge cases a GPU run should cover once:
every dtype, D = 1, N = 0/1, batches past the 65,535 grid limit, odd strides, misaligned and expanded
views, strided and transposed masks, offsets past 2^31 elements, bitwise determinism.

About 2,400 checks: a GPU-only module (skipped on the CPU), not part of the quick `pytest -m gpu` pass.
"""

import pytest
import torch

from regap_fast.backends import torch_backend as R
from regap_fast.contracts import BroadcastSide, GapStats

from helpers import random_mask, random_tokens, rel_err, requires_gpu

pytestmark = [requires_gpu, pytest.mark.cuda_ext]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def C():
    from regap_fast import backends

    reason = backends.why_unavailable("cuda", torch.device(DEV), torch.float32)
    if reason:
        pytest.skip(reason)
    return backends.get("cuda")


def poison(x, mask):
    if mask is None:
        return x
    x[~mask] = float("nan")  # in place, through the view: the layout under test is kept
    return x


def tokens(B, N, D, dtype, layout, shift=0.0):
    """[B, N, D] tokens with the given memory layout (the shift is added in place: the layout stays)."""
    if layout == "contig":
        x = torch.randn(B, N, D, device=DEV).to(dtype)
    elif layout == "noncontig":
        x = random_tokens(B, N, D, dtype, DEV, noncontiguous=True)
    elif layout.startswith("offset"):  # a view starting k elements into its storage: misaligned
        k = int(layout[6:])
        x = torch.randn(B * N * D + k, device=DEV).to(dtype)[k:].view(B, N, D)
    elif layout == "expanded":  # stride 0 along N
        return (torch.randn(B, 1, D, device=DEV) + shift).to(dtype).expand(B, N, D)
    elif layout == "padded":  # rows of a wider buffer: D contiguous, stride_n = D + 8
        x = torch.randn(B, N, D + 8, device=DEV).to(dtype)[:, :, :D]
    else:
        raise ValueError(layout)
    if shift:
        x.add_(shift)
    return x


def masks(B, N, kind):
    return {None: lambda: None,
            "random": lambda: random_mask(B, N, DEV, empty_rows=(0,) if B > 2 else ()),
            "strided": lambda: random_mask(B, 2 * N, DEV)[:, ::2],  # every other column of a wider mask
            "transposed": lambda: random_mask(N, B, DEV).t(),
            "empty": lambda: torch.zeros(B, N, dtype=torch.bool, device=DEV),
            "full": lambda: torch.ones(B, N, dtype=torch.bool, device=DEV)}[kind]()


def _cases():
    shapes = [(1, 1, 1, 1), (2, 5, 3, 7), (3, 33, 17, 70), (4, 1, 9, 130), (2, 40, 65, 1), (5, 64, 32, 96),
              (3, 0, 5, 8), (2, 7, 0, 16), (3, 0, 0, 4), (2, 300, 7, 264), (7, 1000, 3, 8),
              (2, 5, 3, 8200), (2, 4, 3, 1030), (3, 3000, 1500, 16), (2, 3, 2, 4100)]
    for dtype in DTYPES:
        for shape in shapes:
            for mi, mt in ((None, None), (None, "random"), ("random", "random")):
                yield (*shape, dtype, "contig", "contig", mi, mt, "mean", False)
        for li, lt in (("noncontig", "noncontig"), ("contig", "noncontig"), ("offset1", "offset2"),
                       ("offset3", "contig"), ("expanded", "padded"), ("padded", "offset4")):
            for shape in ((3, 21, 10, 37), (2, 8, 5, 24), (4, 70, 33, 256), (2, 5, 3, 1)):
                yield (*shape, dtype, li, lt, "random", "strided", "mean", False)
                yield (*shape, dtype, li, lt, None, None, "sum", True)
        for red in ("mean", "sum", "none"):
            for sq in (False, True):
                yield (5, 19, 11, 45, dtype, "contig", "contig", "transposed", "random", red, sq)
                yield (4, 9, 6, 32, dtype, "contig", "contig", "empty", "random", red, sq)
                yield (4, 9, 6, 32, dtype, "contig", "contig", "full", "empty", red, sq)
        # the LLaVA shapes
        yield (32, 576, 128, 4096, dtype, "contig", "contig", None, "random", "mean", False)
        yield (4, 576, 128, 5120, dtype, "contig", "contig", "random", "random", "sum", False)
    # batches beyond the 65,535 grid limit (the kernels loop over the batch)
    yield (70000, 3, 2, 8, torch.float32, "contig", "contig", "random", None, "mean", False)
    yield (70000, 2, 3, 20, torch.bfloat16, "contig", "contig", None, "random", "none", False)


def _assert_same_broadcast(C, v, g, w, side_a, side_t, dtype):
    for got, want in zip(C.broadcast_rows(v, g, w, side_a, side_t, dtype),
                         R.broadcast_rows(v, g, w, side_a, side_t, dtype)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_cuda_primitives_match_torch(C, case):
    B, Ni, Nt, D, dtype, li, lt, mi, mt, reduction, squared = case
    img, txt = tokens(B, Ni, D, dtype, li), tokens(B, Nt, D, dtype, lt, shift=0.5)
    im, tm = masks(B, Ni, mi), masks(B, Nt, mt)
    img = img if li == "expanded" else poison(img, im)
    txt = txt if lt == "expanded" else poison(txt, tm)
    got = C.gap_loss_forward(img, txt, im, tm, reduction, squared)
    want = R.gap_loss_forward(img, txt, im, tm, reduction, squared)
    for c, r in zip(got, want):
        assert c.shape == r.shape and c.dtype == r.dtype and torch.isfinite(c).all()
        assert rel_err(c, r) <= 2e-5
    _, direction, stats = want
    assert torch.equal(got[2][:2], stats[:2])  # 1/n exactly
    stats = GapStats.of(stats)
    g = torch.rand(B, device=DEV) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEV)
    side_i = BroadcastSide(stats.inv_image, Ni, im)
    side_t = BroadcastSide(stats.inv_caption, Nt, tm, sign=-1.0)
    for a, t in ((side_i, side_t), (side_i, None), (None, side_t)):
        _assert_same_broadcast(C, direction, g, stats.weight, a, t, dtype)
    # masked_mean on the image side, and its backward (also with an expanded gradient, as from out.sum())
    mc, ic = C.masked_mean_forward(img, im)
    mr, ir = R.masked_mean_forward(img, im)
    assert rel_err(mc, mr) <= 2e-6 and torch.equal(ic, ir) and torch.isfinite(mc).all()
    one = torch.ones((), device=DEV)
    for grad in (torch.randn(B, D, device=DEV), torch.ones(1, 1, device=DEV).expand(B, D)):
        _assert_same_broadcast(C, grad, one, one, BroadcastSide(ic, Ni, im), None, dtype)


def test_offsets_past_two_to_the_31(C):
    """[2, 600000, 4096] bf16 (9.8 GB): every offset past 2^31 elements is formed in 64 bits."""
    B, N, D = 2, 600_000, 4096
    x = torch.empty(B, N, D, device=DEV, dtype=torch.bfloat16)
    for b in range(B):
        x[b].normal_()
    x[:, -1, :] += 3.0  # the last rows must be read
    m = torch.ones(B, N, dtype=torch.bool, device=DEV)
    m[1, ::3] = False
    txt = torch.randn(B, 8, D, device=DEV, dtype=torch.bfloat16)
    ref_mean = torch.stack([torch.where(m[b].unsqueeze(-1), x[b], 0).sum(0, dtype=torch.float32)
                            for b in range(B)]) / m.sum(1, keepdim=True).float()
    mean, _ = C.masked_mean_forward(x, m)
    assert rel_err(mean, ref_mean) <= 1e-4
    loss, direction, stats = C.gap_loss_forward(x, txt, m, None, "none", False)
    assert rel_err(loss, (ref_mean - txt.float().mean(1)).norm(dim=1)) <= 1e-4
    stats = GapStats.of(stats)
    v = torch.randn(B, D, device=DEV)
    g = torch.tensor([0.5, 2.0], device=DEV)
    out, _ = C.broadcast_rows(v, g, stats.weight, BroadcastSide(stats.inv_image, N, m), None, torch.bfloat16)
    expect = (((g * stats.weight) * stats.inv_image)[:, None] * v).to(torch.bfloat16)
    for s in range(0, N, 50_000):  # checked in slices: the dense gradient is 9.8 GB
        ok = torch.where(m[:, s:s + 50_000, None], out[:, s:s + 50_000] == expect[:, None, :],
                         out[:, s:s + 50_000] == 0)
        assert ok.all(), s


def test_bitwise_determinism(C):
    img = torch.randn(32, 576, 4096, device=DEV, dtype=torch.bfloat16)
    txt = torch.randn(32, 128, 4096, device=DEV, dtype=torch.bfloat16)
    tm = random_mask(32, 128, DEV)
    first = C.gap_loss_forward(img, txt, None, tm, "mean", False)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, C.gap_loss_forward(img, txt, None, tm, "mean", False)))
    x = torch.randn(3, 5000, 1024, device=DEV)
    assert all(torch.equal(a, b) for a, b in zip(C.masked_mean_forward(x, None), C.masked_mean_forward(x, None)))
