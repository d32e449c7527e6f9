"""GPU-only checks of the cuda backend's projector and text_pool primitives (csrc/projector.cu,
csrc/text_pool.cu) against float64 torch computations.

Each kernel output is compared with the float64 value of the same formula on the same inputs, and
each fp32 sum with the float64 sum of the very values the kernel stored (h, dpre), so that a row
counted twice, a row of the wrong sample or a missed row shows up far above the rounding error.
Sizes: odd ones that hit every path of the launch plans (rows_per_sample = 1, > M, not dividing M,
samples cut into pieces, whole samples per block, one warp per sample, batch larger or smaller than
the samples present), misaligned and strided views, empty samples, NaN in masked rows, and
LLaVA-1.5-7B's [32 * 576, 4096] bf16.
"""

import math

import pytest
import torch

from regap_fast import backends

from helpers import random_mask

pytestmark = [pytest.mark.cuda_ext,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _module(family):
    reason = backends.why_unavailable("cuda", DEV, torch.float32, family)
    if reason:
        pytest.skip(reason)
    return backends.get("cuda", family)


@pytest.fixture
def proj():
    return _module("projector")


@pytest.fixture
def text():
    return _module("text_pool")


def _C():
    import regap_fast._C as C
    return C


# --------------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------------


def gelu64(x):
    x = x.double()
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_grad64(x):
    x = x.double()
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _row_samples(M, rows_per_sample, device=DEV):
    return torch.arange(M, device=device) // rows_per_sample


def _valid_rows(M, mask_flat):
    return torch.ones(M, dtype=torch.bool, device=DEV) if mask_flat is None else mask_flat


def pooled_sums64(h, mask_flat, rows_per_sample, batch):
    """(sum over valid rows of each sample of h, sum of |h|) in float64; rows of samples >= batch dropped."""
    M, N = h.shape
    hd = h.double()
    keep = _valid_rows(M, mask_flat) & (_row_samples(M, rows_per_sample) < batch)
    hd = torch.where(keep[:, None], hd, 0.0)  # where: masked rows may hold NaN
    idx = _row_samples(M, rows_per_sample).clamp(max=max(batch - 1, 0))
    out = torch.zeros(batch, N, dtype=torch.float64, device=DEV)
    mag = torch.zeros(batch, N, dtype=torch.float64, device=DEV)
    if batch > 0 and M > 0:
        out.index_add_(0, idx, hd)
        mag.index_add_(0, idx, hd.abs())
    return out, mag


def assert_sum_close(got, ref, mag, what, rel=1e-5):
    """fp32 sums: |got - ref| <= rel * sum|terms| (a missed or doubled term is far larger)."""
    got = got.double()
    err = (got - ref).abs()
    bound = rel * mag + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} sums off, worst "
                           f"{(err / bound.clamp(min=1e-30)).max().item():.3g}x the bound")


def assert_rounded_close(got, ref64, dtype, what, atol=1e-6, ulps=1.0):
    """got (dtype) vs a float64 value: within `ulps` units in the last place of dtype (relative),
    plus an absolute floor for values computed with cancellation in fp32 (as PyTorch computes them)."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref64, rtol=ulps * eps * 1.01, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def misaligned(M, N, dtype, how):
    """A [M, N] view whose data is not 16-byte aligned ('offset'), whose rows are not ('stride'), or
    whose columns are strided ('colstride')."""
    if how == "offset":
        base = torch.randn(M * N + 1, device=DEV).to(dtype)
        return base[1:].view(M, N)
    if how == "stride":
        return torch.randn(M, N + 3, device=DEV).to(dtype)[:, :N]
    if how == "colstride":
        return torch.randn(M, 2 * N, device=DEV).to(dtype)[:, ::2]
    return torch.randn(M, N, device=DEV).to(dtype)


def strided_row_mask(M, p=0.7):
    """A [M] bool view with stride 2 (as image_mask.reshape(-1) of a column-sliced mask gives)."""
    return (torch.rand(2 * M, device=DEV) < p)[::2]


def sample_mask(M, rows_per_sample, p=0.7, empty=(0,)):
    m = torch.rand(M, device=DEV) < p
    s = _row_samples(M, rows_per_sample)
    for b in empty:
        m[s == b] = False
    return m


# --------------------------------------------------------------------------------------------------
# forward epilogue: h = GELU(pre) and the pooled sums
# --------------------------------------------------------------------------------------------------

# (M, N, rows_per_sample, batch): N = 1; rows_per_sample = 1, > M, not dividing M; batch larger
# than the samples present (zero rows) or smaller (rows not pooled); samples cut into pieces
# (600 / 100, 1153 / 577); many short samples (one warp per sample); whole long samples per block.
FWD_SIZES = [(1, 1, 1, 1), (5, 3, 7, 1), (37, 20, 1, 37), (37, 20, 5, 8), (10, 8, 2, 3), (4, 8, 2, 5),
             (600, 72, 100, 6), (1153, 264, 577, 2), (50002, 40, 3, 16668), (64, 1, 64, 1),
             (333, 520, 65, 6)]


def _check_forward(C, pre, mask, rps, batch, pool=True):
    h, pooled = C.gelu_pool_forward(pre, mask, rps, batch, pool)
    assert h.dtype == pre.dtype and h.shape == pre.shape
    assert_rounded_close(h, gelu64(pre), pre.dtype, "h")
    if not pool:
        assert pooled is None
        return h, None
    assert pooled.dtype == torch.float32 and pooled.shape == (batch, pre.shape[1])
    ref, mag = pooled_sums64(h, mask, rps, batch)
    assert_sum_close(pooled, ref, mag, "pooled_sum")
    # samples with no valid row: exactly 0
    M = pre.shape[0]
    counts = torch.zeros(batch, device=DEV, dtype=torch.long)
    if M and batch:
        keep = _valid_rows(M, mask) & (_row_samples(M, rps) < batch)
        counts.index_add_(0, _row_samples(M, rps).clamp(max=batch - 1), keep.long())
    assert (pooled[counts == 0] == 0).all()
    return h, pooled


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", FWD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_gelu_pool_forward(proj, dtype, size, masked):
    M, N, rps, batch = size
    pre = (torch.randn(M, N, device=DEV) * 2).to(dtype)
    mask = sample_mask(M, rps) if masked else None
    if mask is not None:
        pre[~mask] = float("nan")  # GELU(NaN) is NaN in h, but those rows must not reach the sums
    _check_forward(_C(), pre, mask, rps, batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "stride", "colstride"])
def test_gelu_pool_forward_views(proj, dtype, how):
    M, N, rps = 203, 48, 29
    pre = misaligned(M, N, dtype, how)
    _check_forward(_C(), pre, strided_row_mask(M), rps, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1), (300, 17), (70001, 24)])
def test_gelu_forward_without_pool(proj, dtype, size):
    pre = torch.randn(*size, device=DEV).to(dtype)
    _check_forward(_C(), pre, None, 1, 0, pool=False)


def test_gelu_pool_forward_empty(proj):
    C = _C()
    h, pooled = C.gelu_pool_forward(torch.empty(0, 16, device=DEV), None, 4, 3, True)
    assert h.shape == (0, 16) and (pooled == 0).all() and pooled.shape == (3, 16)
    h, pooled = C.gelu_pool_forward(torch.randn(8, 0, device=DEV), None, 4, 2, True)
    assert h.shape == (8, 0) and pooled.shape == (2, 0)


def test_gelu_pool_forward_long_samples(proj):
    """Whole long samples per block (several samples in one block's rows, shared-memory step each)."""
    M, N, rps = 400000, 16, 80
    pre = torch.randn(M, N, device=DEV)
    _check_forward(_C(), pre, sample_mask(M, rps, empty=(0, 7)), rps, M // rps)


def test_gelu_pool_forward_deterministic(proj):
    C = _C()
    pre = torch.randn(5000, 300, device=DEV).bfloat16()
    mask = strided_row_mask(5000)
    a = C.gelu_pool_forward(pre, mask, 577, 9, True)
    b = C.gelu_pool_forward(pre, mask, 577, 9, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# backward epilogue: dpre = (dh + vw2[sample] on valid rows) * GELU'(pre), db = column sums
# --------------------------------------------------------------------------------------------------


def dpre64(dh, pre, mask, rps, vw2):
    d = dh.double()
    if vw2 is not None:
        M = dh.shape[0]
        s = _row_samples(M, rps)
        ok = _valid_rows(M, mask) & (s < vw2.shape[0])
        add = vw2.double()[s.clamp(max=vw2.shape[0] - 1)]
        d = d + torch.where(ok[:, None], add, 0.0)
    return d * gelu_grad64(pre)


def _check_backward(C, dh, pre, mask, rps, vw2, need_dbias, overwrite=False):
    dh_before = dh.clone()
    ref = dpre64(dh, pre, mask, rps, vw2)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    dpre, db = C.dgelu_backward(dh, pre, mask, rps, vw2, need_dbias, overwrite)
    assert dpre.dtype == pre.dtype and dpre.shape == pre.shape
    assert_rounded_close(dpre, ref, pre.dtype, "dpre", atol=1e-6 * max(scale, 1.0))
    if not overwrite:
        assert torch.equal(dh, dh_before), "dh was written although overwrite_dh=False"
    if need_dbias:
        assert db.dtype == torch.float32 and db.shape == (pre.shape[1],)
        d = dpre.double()
        assert_sum_close(db, d.sum(0), d.abs().sum(0), "db")
    else:
        assert db is None
    return dpre, db


BWD_SIZES = [(1, 1, 1, 1), (5, 3, 7, 1), (37, 20, 1, 37), (37, 20, 5, 8), (10, 8, 2, 3), (600, 72, 100, 6),
             (1153, 264, 577, 2), (20001, 40, 3, 6667)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", BWD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_vec", [False, True])
def test_dgelu_backward(proj, dtype, size, masked, with_vec):
    M, N, rps, batch = size
    dh = torch.randn(M, N, device=DEV).to(dtype)
    pre = (torch.randn(M, N, device=DEV) * 2).to(dtype)
    mask = sample_mask(M, rps) if masked else None
    vw2 = torch.randn(batch, N, device=DEV) if with_vec else None
    _check_backward(_C(), dh, pre, mask, rps, vw2, need_dbias=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "stride", "colstride"])
def test_dgelu_backward_views(proj, dtype, how):
    M, N, rps = 203, 48, 29
    dh = misaligned(M, N, dtype, how)
    pre = misaligned(M, N, dtype, "offset" if how != "offset" else "stride")
    vw2 = torch.randn(N, 7, device=DEV).t()  # a transposed [7, N] view: strides (1, 7)
    _check_backward(_C(), dh, pre, strided_row_mask(M), rps, vw2, need_dbias=True)


def test_dgelu_backward_in_place_and_options(proj):
    C = _C()
    M, N, rps = 999, 130, 111
    pre = torch.randn(M, N, device=DEV).bfloat16()
    vw2 = torch.randn(5, N, device=DEV)  # fewer rows than the 9 samples: samples >= 5 get nothing
    dh = torch.randn(M, N, device=DEV).bfloat16()
    ref, _ = _check_backward(C, dh, pre, None, rps, vw2, need_dbias=False)
    dh2 = dh.clone()
    out, db = C.dgelu_backward(dh2, pre, None, rps, vw2, True, True)
    assert out.data_ptr() == dh2.data_ptr() and torch.equal(out, ref)
    # vw2 in bf16 is converted; rows_per_sample is ignored without vw2
    out2, _ = C.dgelu_backward(dh, pre, None, 0, None, False, False)
    assert_rounded_close(out2, dpre64(dh, pre, None, 1, None), torch.bfloat16, "dpre without vw2")
    out3, _ = C.dgelu_backward(dh, pre, None, rps, vw2.bfloat16(), False, False)
    assert_rounded_close(out3, dpre64(dh, pre, None, rps, vw2.bfloat16().float()), torch.bfloat16, "bf16 vw2",
                         atol=1e-5)


def test_dgelu_backward_empty(proj):
    C = _C()
    dpre, db = C.dgelu_backward(torch.empty(0, 9, device=DEV), torch.empty(0, 9, device=DEV), None, 3,
                                torch.randn(2, 9, device=DEV), True, True)
    assert dpre.shape == (0, 9) and db.shape == (9,) and (db == 0).all()


def test_dgelu_backward_deterministic(proj):
    C = _C()
    dh = torch.randn(18000, 300, device=DEV).bfloat16()
    pre = torch.randn(18000, 300, device=DEV).bfloat16()
    vw2 = torch.randn(32, 300, device=DEV)
    a = C.dgelu_backward(dh, pre, None, 576, vw2, True, False)
    b = C.dgelu_backward(dh, pre, None, 576, vw2, True, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# the backend primitives (cuBLAS GEMM + epilogue), as _FusedMlpGelu calls them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gelu_gemm_forward_primitive(proj, dtype, bias):
    B, n, K, N = 3, 37, 48, 72
    x = torch.randn(B * n, K, device=DEV).to(dtype)
    w1 = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    b1 = torch.randn(N, device=DEV).to(dtype) if bias else None
    mask = sample_mask(B * n, n, empty=(1,))
    pre, h, pooled = proj.gelu_gemm_forward(x, w1, b1, mask, n, B, pool=True)
    ref_pre = x.double() @ w1.double().t() + (b1.double() if bias else 0.0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(pre.double(), ref_pre, rtol=tol, atol=tol)
    assert_rounded_close(h, gelu64(pre), dtype, "h")
    ref, mag = pooled_sums64(h, mask, n, B)
    assert_sum_close(pooled, ref, mag, "pooled_sum")
    assert (pooled[1] == 0).all()
    _, _, none = proj.gelu_gemm_forward(x, w1, b1, None, n, B, pool=False)
    assert none is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_dgelu_gemm_backward_primitive(proj, dtype):
    B, n, K, N = 3, 37, 40, 72
    M = B * n
    dy = torch.randn(K, M, device=DEV).to(dtype).t()  # non-contiguous, as autograd may pass it
    w2 = (torch.randn(K, N, device=DEV) / K ** 0.5).to(dtype)
    pre = torch.randn(M, N, device=DEV).to(dtype)
    mask = sample_mask(M, n, empty=(2,))
    vw2 = torch.randn(B, N, device=DEV)
    dpre, db = proj.dgelu_gemm_backward(dy, w2, pre, mask, n, vw2, True)
    dh = dy.double() @ w2.double()
    ref = dpre64(dh, pre, mask, n, vw2)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(dpre.double(), ref, rtol=tol, atol=tol)
    d = dpre.double()
    assert_sum_close(db, d.sum(0), d.abs().sum(0), "db")
    _, none = proj.dgelu_gemm_backward(dy, w2, pre, None, n, None, False)
    assert none is None


def test_projector_primitives_llava7b_bf16(proj):
    """LLaVA-1.5-7B: B = 32 images of 576 tokens, D = 4096, bf16, some images padded out entirely."""
    B, n, D = 32, 576, 4096
    M = B * n
    C = _C()
    pre = (torch.randn(M, D, device=DEV) * 1.5).bfloat16()
    mask = sample_mask(M, n, p=1.0, empty=(3, 17))
    h, pooled = _check_forward(C, pre, mask, n, B)
    del h, pooled
    h2, pooled2 = _check_forward(C, pre, None, n, B)
    del h2, pooled2
    dh = (torch.randn(M, D, device=DEV) * 1e-2).bfloat16()
    vw2 = torch.randn(B, D, device=DEV) * 1e-3
    _check_backward(C, dh, pre, mask, n, vw2, need_dbias=True)
    _check_backward(C, dh, pre, None, n, None, need_dbias=True)


def test_projector_primitives_cuda_graph(proj):
    """Both epilogues (memset and finish kernels included) capture into a CUDA graph and replay."""
    C = _C()
    pre = torch.randn(1153, 264, device=DEV).bfloat16()
    dh = torch.randn(1153, 264, device=DEV).bfloat16()
    vw2 = torch.randn(3, 264, device=DEV)
    mask = strided_row_mask(1153)
    eager = (C.gelu_pool_forward(pre, mask, 577, 3, True), C.dgelu_backward(dh, pre, mask, 577, vw2, True, False))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (plans, occupancy queries)
        C.gelu_pool_forward(pre, mask, 577, 3, True)
        C.dgelu_backward(dh, pre, mask, 577, vw2, True, False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fwd = C.gelu_pool_forward(pre, mask, 577, 3, True)
        bwd = C.dgelu_backward(dh, pre, mask, 577, vw2, True, False)
    g.replay()
    torch.cuda.synchronize()
    for got, want in zip((*fwd, *bwd), (*eager[0], *eager[1])):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# text_pool: gather_mean_forward
# --------------------------------------------------------------------------------------------------


def gather_mean64(ids, weight, mask):
    rows = weight.double()[ids.long()]  # [B, T, D]
    B, T = ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=DEV) if mask is None else mask
    rows = torch.where(valid[..., None], rows, 0.0)
    n = valid.sum(1)
    s = rows.sum(1)
    mag = rows.abs().sum(1)
    inv = torch.where(n > 0, 1.0 / n.clamp(min=1).float(), torch.zeros((), device=DEV))
    mean = s * inv.double()[:, None]
    return mean, mag * inv.double()[:, None], inv


def _check_gather(C, ids, weight, mask):
    mean, inv = C.gather_mean_forward(ids, weight, mask)
    B, D = ids.shape[0], weight.shape[1]
    assert mean.dtype == inv.dtype == torch.float32 and mean.shape == (B, D) and inv.shape == (B,)
    ref, mag, ref_inv = gather_mean64(ids, weight, mask)
    assert torch.equal(inv, ref_inv), "inv_count"
    assert_sum_close(mean, ref, mag, "mean", rel=2e-5)
    assert (mean[ref_inv == 0] == 0).all()
    return mean, inv


# (B, T, V, D): D = 1, T = 1, T not a multiple of anything, B = 1 with long captions (token chunks
# and the finish kernel), B over the 65535 grid limit, LLaVA's B = 32 captions of 64 tokens, D = 4096
GATHER_SIZES = [(1, 1, 1, 1), (4, 9, 37, 19), (3, 33, 50, 70), (1, 5000, 1000, 256), (2, 3000, 64, 8),
                (70000, 2, 50, 8), (32, 64, 32000, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", GATHER_SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_gather_mean_forward(text, dtype, size, masked, id_dtype):
    B, T, V, D = size
    weight = torch.randn(V + 1, D, device=DEV).to(dtype)
    weight[V] = float("nan")  # the row that masked-out tokens point to: it must never be read
    ids = torch.randint(0, V, (B, T), device=DEV)
    mask = random_mask(B, T, DEV, p=0.7, empty_rows=(0,) if B > 1 else ()) if masked else None
    if mask is not None:
        ids[~mask] = V
    _check_gather(_C(), ids.to(id_dtype), weight, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "colstride", "transposed", "ids_view", "mask_view"])
def test_gather_mean_forward_views(text, dtype, how):
    B, T, V, D = 5, 41, 300, 72
    weight = torch.randn(V, D, device=DEV).to(dtype)
    ids = torch.randint(0, V, (B, T), device=DEV)
    mask = random_mask(B, T, DEV, empty_rows=(2,))
    if how == "offset":
        weight = torch.cat([torch.zeros(1, device=DEV, dtype=dtype), weight.reshape(-1)])[1:].view(V, D)
    elif how == "colstride":
        weight = torch.randn(V, 2 * D, device=DEV).to(dtype)[:, ::2]
    elif how == "transposed":
        weight = torch.randn(D, V, device=DEV).to(dtype).t()
    elif how == "ids_view":
        ids = torch.randint(0, V, (T, B), device=DEV).t()
    elif how == "mask_view":
        mask = (torch.rand(B, 2 * T, device=DEV) < 0.6)[:, ::2]
    _check_gather(_C(), ids, weight, mask)


def test_gather_mean_forward_edges(text):
    C = _C()
    w = torch.randn(10, 6, device=DEV)
    mean, inv = C.gather_mean_forward(torch.zeros(3, 0, dtype=torch.long, device=DEV), w, None)
    assert (mean == 0).all() and (inv == 0).all()
    mean, inv = C.gather_mean_forward(torch.zeros(2, 5, dtype=torch.long, device=DEV),
                                      torch.randn(10, 0, device=DEV), torch.ones(2, 5, dtype=torch.bool, device=DEV))
    assert mean.shape == (2, 0) and torch.equal(inv, torch.full((2,), 0.2, device=DEV))
    mean, inv = C.gather_mean_forward(torch.zeros(0, 5, dtype=torch.long, device=DEV), w, None)
    assert mean.shape == (0, 6) and inv.shape == (0,)


def test_gather_mean_forward_deterministic(text):
    C = _C()
    weight = torch.randn(1000, 256, device=DEV).bfloat16()
    ids = torch.randint(0, 1000, (1, 5000), device=DEV)
    a = C.gather_mean_forward(ids, weight, None)
    b = C.gather_mean_forward(ids, weight, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gather_mean_matches_primitive_contract(text):
    """The backend function (what pooled_text_embeddings calls) is the _C function."""
    weight = torch.randn(50, 24, device=DEV)
    ids = torch.randint(0, 50, (4, 7), device=DEV)
    mask = random_mask(4, 7, DEV, empty_rows=(1,))
    got = text.gather_mean_forward(ids, weight, mask)
    ref, _, ref_inv = gather_mean64(ids, weight, mask)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], ref_inv)
