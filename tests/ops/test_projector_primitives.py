"""The ``projector`` family's primitives on every backend (torch and Triton on the CPU, all three on a
GPU) against float64 computations: ``gelu_pool_forward``, ``dgelu_backward``, ``mean_split``.

Each kernel output is compared with the float64 value of the same formula on the same inputs, and
each fp32 sum with the float64 sum of the very values the kernel stored (h, dpre), so that a row
counted twice, a row of the wrong sample or a missed row shows up far above the rounding error.
Sizes: odd ones that hit every path of the launch plans (rows_per_sample = 1, > M, not dividing M,
samples cut into pieces, whole samples per block, one warp per sample, batch larger or smaller than
the samples present), misaligned and strided views, empty samples, NaN in masked rows; on a GPU also
large ones and LLaVA-1.5-7B's [32 * 576, 4096] bf16.
"""

import math

import pytest
import torch

from regap_fast import backends

from helpers import DEVICE, all_backend_params, assert_gelu_close, assert_rounded_close, assert_sum_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not GPU, reason="a GPU-sized case (slow in the Triton interpreter)")


@pytest.fixture(params=all_backend_params("projector"))
def impl(request):
    return backends.get(request.param, "projector")


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


def _row_samples(M, rows_per_sample):
    return torch.arange(M, device=DEVICE) // rows_per_sample


def _valid_rows(M, mask_flat):
    return torch.ones(M, dtype=torch.bool, device=DEVICE) if mask_flat is None else mask_flat


def pooled_sums64(h, mask_flat, rows_per_sample, batch):
    """(sum over valid rows of each sample of h, sum of |h|) in float64; rows of samples >= batch dropped."""
    M, N = h.shape
    keep = _valid_rows(M, mask_flat) & (_row_samples(M, rows_per_sample) < batch)
    hd = torch.where(keep[:, None], h.double(), 0.0)  # where: masked rows may hold NaN
    idx = _row_samples(M, rows_per_sample).clamp(max=max(batch - 1, 0))
    out = torch.zeros(batch, N, dtype=torch.float64, device=DEVICE)
    mag = torch.zeros(batch, N, dtype=torch.float64, device=DEVICE)
    if batch > 0 and M > 0:
        out.index_add_(0, idx, hd)
        mag.index_add_(0, idx, hd.abs())
    return out, mag


def misaligned(M, N, dtype, how):
    """A [M, N] view whose data is not 16-byte aligned ('offset'), whose rows are not ('stride'), or
    whose columns are strided ('colstride')."""
    if how == "offset":
        return torch.randn(M * N + 1, device=DEVICE).to(dtype)[1:].view(M, N)
    if how == "stride":
        return torch.randn(M, N + 3, device=DEVICE).to(dtype)[:, :N]
    if how == "colstride":
        return torch.randn(M, 2 * N, device=DEVICE).to(dtype)[:, ::2]
    return torch.randn(M, N, device=DEVICE).to(dtype)


def strided_row_mask(M, p=0.7):
    """A [M] bool view with stride 2 (as image_mask.reshape(-1) of a column-sliced mask gives)."""
    return (torch.rand(2 * M, device=DEVICE) < p)[::2]


def sample_mask(M, rows_per_sample, p=0.7, empty=(0,)):
    m = torch.rand(M, device=DEVICE) < p
    s = _row_samples(M, rows_per_sample)
    for b in empty:
        m[s == b] = False
    return m


# --------------------------------------------------------------------------------------------------
# gelu_pool_forward: h = GELU(pre) and the pooled sums
# --------------------------------------------------------------------------------------------------

# (M, N, rows_per_sample, batch): N = 1; rows_per_sample = 1, > M, not dividing M; batch larger
# than the samples present (zero rows) or smaller (rows not pooled); samples cut into pieces
# (600 / 100, 1153 / 577); many short samples; whole long samples per block.
FWD_SIZES = [(1, 1, 1, 1), (5, 3, 7, 1), (37, 20, 1, 37), (37, 20, 5, 8), (10, 8, 2, 3), (4, 8, 2, 5),
             (600, 72, 100, 6), (1153, 264, 577, 2), (64, 1, 64, 1), (333, 520, 65, 6),
             pytest.param((50002, 40, 3, 16668), marks=gpu_only)]


def _check_forward(impl, pre, mask, rps, batch, pool=True):
    h, pooled = impl.gelu_pool_forward(pre, mask, rps, batch, pool)
    assert h.dtype == pre.dtype and h.shape == pre.shape
    assert_gelu_close(h, pre)
    if not pool:
        assert pooled is None
        return h, None
    assert pooled.dtype == torch.float32 and pooled.shape == (batch, pre.shape[1])
    ref, mag = pooled_sums64(h, mask, rps, batch)
    assert_sum_close(pooled, ref, mag, "pooled_sum")
    M = pre.shape[0]  # samples with no valid row: exactly 0
    counts = torch.zeros(batch, device=DEVICE, dtype=torch.long)
    if M and batch:
        keep = _valid_rows(M, mask) & (_row_samples(M, rps) < batch)
        counts.index_add_(0, _row_samples(M, rps).clamp(max=batch - 1), keep.long())
    assert (pooled[counts == 0] == 0).all()
    return h, pooled


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", FWD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_gelu_pool_forward(impl, dtype, size, masked):
    M, N, rps, batch = size
    pre = (torch.randn(M, N, device=DEVICE) * 2).to(dtype)
    mask = sample_mask(M, rps) if masked else None
    if mask is not None:
        pre[~mask] = float("nan")  # GELU(NaN) is NaN in h, but those rows must not reach the sums
    _check_forward(impl, pre, mask, rps, batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "stride", "colstride"])
def test_gelu_pool_forward_views(impl, dtype, how):
    M, N, rps = 203, 48, 29
    _check_forward(impl, misaligned(M, N, dtype, how), strided_row_mask(M), rps, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1), (300, 17), pytest.param((70001, 24), marks=gpu_only)])
def test_gelu_forward_without_pool(impl, dtype, size):
    _check_forward(impl, torch.randn(*size, device=DEVICE).to(dtype), None, 1, 0, pool=False)


def test_gelu_pool_forward_empty(impl):
    h, pooled = impl.gelu_pool_forward(torch.empty(0, 16, device=DEVICE), None, 4, 3, True)
    assert h.shape == (0, 16) and (pooled == 0).all() and pooled.shape == (3, 16)
    h, pooled = impl.gelu_pool_forward(torch.randn(8, 0, device=DEVICE), None, 4, 2, True)
    assert h.shape == (8, 0) and pooled.shape == (2, 0)


@gpu_only
def test_gelu_pool_forward_long_samples(impl):
    """Whole long samples per block (several samples in one block's rows)."""
    M, N, rps = 400000, 16, 80
    _check_forward(impl, torch.randn(M, N, device=DEVICE), sample_mask(M, rps, empty=(0, 7)), rps, M // rps)


def test_gelu_pool_forward_deterministic(impl):
    M = 5000 if GPU else 700
    pre = torch.randn(M, 300, device=DEVICE).bfloat16()
    mask = strided_row_mask(M)
    a = impl.gelu_pool_forward(pre, mask, 277, 3, True)
    b = impl.gelu_pool_forward(pre, mask, 277, 3, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# dgelu_backward: dpre = (dh + vec[sample] on valid rows) * GELU'(pre), db = column sums
# --------------------------------------------------------------------------------------------------


def dpre64(dh, pre, mask, rps, vec):
    d = dh.double()
    if vec is not None:
        M = dh.shape[0]
        s = _row_samples(M, rps)
        ok = _valid_rows(M, mask) & (s < vec.shape[0])
        d = d + torch.where(ok[:, None], vec.double()[s.clamp(max=vec.shape[0] - 1)], 0.0)
    return d * gelu_grad64(pre)


def _check_backward(impl, dh, pre, mask, rps, vec, need_dbias, vec_rounding=None):
    ref = dpre64(dh, pre, mask, rps, vec if vec_rounding is None else vec.to(vec_rounding).float())
    scale = ref.abs().max().item() if ref.numel() else 1.0
    dpre, db = impl.dgelu_backward(dh.clone(), pre, mask, rps, vec, need_dbias)
    assert dpre.dtype == pre.dtype and dpre.shape == pre.shape
    assert_rounded_close(dpre, ref, pre.dtype, "dpre", atol=1e-6 * max(scale, 1.0), ulps=2.0)
    if need_dbias:
        assert db.dtype == torch.float32 and db.shape == (pre.shape[1],)
        d = dpre.double()
        assert_sum_close(db, d.sum(0), d.abs().sum(0), "db")
    else:
        assert db is None
    return dpre, db


BWD_SIZES = [(1, 1, 1, 1), (5, 3, 7, 1), (37, 20, 1, 37), (37, 20, 5, 8), (10, 8, 2, 3), (600, 72, 100, 6),
             (1153, 264, 577, 2), pytest.param((20001, 40, 3, 6667), marks=gpu_only)]


def _vec_rounding(impl, dtype):
    """The torch backend adds the vector to dh explicitly, in dh's dtype (the plain-PyTorch step)."""
    return dtype if impl.__name__.endswith("torch_backend") else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", BWD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_vec", [False, True])
def test_dgelu_backward(impl, dtype, size, masked, with_vec):
    M, N, rps, batch = size
    dh = torch.randn(M, N, device=DEVICE).to(dtype)
    pre = (torch.randn(M, N, device=DEVICE) * 2).to(dtype)
    mask = sample_mask(M, rps) if masked else None
    vec = torch.randn(batch, N, device=DEVICE) if with_vec else None
    if impl.__name__.endswith("torch_backend") and with_vec:
        # the explicit add of vec (rounded to dtype) rounds dh + vec to dtype before GELU': the same here
        ref = dpre64(dh + _broadcast(vec, M, rps, mask).to(dtype), pre, None, rps, None)
        dpre, db = impl.dgelu_backward(dh.clone(), pre, mask, rps, vec, True)
        assert_rounded_close(dpre, ref, dtype, "dpre", atol=1e-6 * max(ref.abs().max().item(), 1.0), ulps=2.0)
        return
    _check_backward(impl, dh, pre, mask, rps, vec, need_dbias=True)


def _broadcast(vec, M, rps, mask):
    s = _row_samples(M, rps)
    ok = _valid_rows(M, mask) & (s < vec.shape[0])
    return torch.where(ok[:, None], vec[s.clamp(max=vec.shape[0] - 1)], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "stride", "colstride"])
def test_dgelu_backward_views(impl, dtype, how):
    if impl.__name__.endswith("torch_backend"):
        pytest.skip("the torch backend adds the vector in dh's dtype: checked in test_dgelu_backward")
    M, N, rps = 203, 48, 29
    dh = misaligned(M, N, dtype, how)
    pre = misaligned(M, N, dtype, "offset" if how != "offset" else "stride")
    vec = torch.randn(N, 7, device=DEVICE).t()  # a transposed [7, N] view: strides (1, 7)
    _check_backward(impl, dh, pre, strided_row_mask(M), rps, vec, need_dbias=True)


def test_dgelu_backward_in_place(impl):
    """dpre is written over a contiguous dh (no second [M, N] buffer) on the kernel backends; samples
    past the vector's rows get nothing."""
    M, N, rps = 999, 130, 111
    pre = torch.randn(M, N, device=DEVICE).bfloat16()
    vec = torch.randn(5, N, device=DEVICE)  # fewer rows than the 9 samples
    dh = torch.randn(M, N, device=DEVICE).bfloat16()
    want = dpre64(dh, pre, None, rps, vec.bfloat16().float() if impl.__name__.endswith("torch_backend") else vec)
    out, db = impl.dgelu_backward(dh, pre, None, rps, vec, False)
    assert db is None
    assert_rounded_close(out, want, torch.bfloat16, "dpre", atol=1e-5, ulps=2.0)
    if not impl.__name__.endswith("torch_backend"):
        assert out.data_ptr() == dh.data_ptr()


def test_dgelu_backward_empty(impl):
    dpre, db = impl.dgelu_backward(torch.empty(0, 9, device=DEVICE), torch.empty(0, 9, device=DEVICE), None, 3,
                                   torch.randn(2, 9, device=DEVICE), True)
    assert dpre.shape == (0, 9) and db.shape == (9,) and (db == 0).all()


def test_dgelu_backward_deterministic(impl):
    M = 18000 if GPU else 1200
    dh = torch.randn(M, 300, device=DEVICE).bfloat16()
    pre = torch.randn(M, 300, device=DEVICE).bfloat16()
    vec = torch.randn(M // 576 + 1, 300, device=DEVICE)
    a = impl.dgelu_backward(dh.clone(), pre, None, 576, vec, True)
    b = impl.dgelu_backward(dh.clone(), pre, None, 576, vec, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# mean_split: v / n as hi/lo rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_counts", [False, True])
def test_mean_split(impl, dtype, with_counts):
    B, N = 6, 37
    v = torch.randn(N, B, device=DEVICE).t() * 40  # a transposed view
    counts = torch.tensor([3.0, 0.0, 7.0, 1.0, 576.0, 21.0], device=DEVICE) if with_counts else None
    parts = impl.mean_split(v, counts, dtype)
    mean64 = v.double() if counts is None else torch.where(counts[:, None] > 0, v.double() / counts.double()[:, None]
                                                           .clamp(min=1), 0.0)
    split = dtype != torch.float32
    assert parts.dtype == dtype and parts.shape == ((2 if split else 1) * B, N)
    got = parts[:B].double() + (parts[B:].double() if split else 0)
    # hi + lo carries ~16 bits (bf16) / ~22 bits (fp16, down to its subnormal spacing 2^-24) of the fp32
    # mean; fp32 is the mean itself. The Triton interpreter converts fp32 to bf16 by truncation (NumPy has
    # no bf16), a GPU rounds to nearest: twice the error there
    truncates = dtype == torch.bfloat16 and impl.__name__.endswith("kernels.projector") and not GPU
    rtol, atol = {torch.float32: (1.2e-7, 0), torch.float16: (2e-6, 2 ** -24),
                  torch.bfloat16: (4e-5 if truncates else 2e-5, 0)}[dtype]
    torch.testing.assert_close(got, mean64, rtol=rtol, atol=atol + 1e-30)
    hi_error = (parts[:B].double() - mean64.float().to(dtype).double()).abs()
    ulp = torch.finfo(dtype).eps * mean64.abs()
    assert (hi_error <= (ulp if truncates else 0)).all()  # the hi row is the (correctly) rounded mean
    if with_counts:
        assert (parts[[1, B + 1] if split else [1]] == 0).all()  # n = 0: a zero mean


def test_triton_launches_past_the_grid_limit(monkeypatch):
    """More row programs than a grid's y dimension takes (65,535 on CUDA): the Triton passes launch in
    several parts, each told its first program. Checked on any device with the limit set to 4."""
    reason = backends.why_unavailable("triton", DEVICE, torch.float32, "projector")
    if reason:
        pytest.skip(reason)
    impl = backends.get("triton", "projector")
    monkeypatch.setattr(impl, "MAX_GRID_Y", 4)
    M, N, rps, batch = 37, 20, 3, 13
    pre = torch.randn(M, N, device=DEVICE) * 2
    mask = sample_mask(M, rps)
    _check_forward(impl, pre, mask, rps, batch)
    _check_backward(impl, torch.randn(M, N, device=DEVICE), pre, mask, rps, torch.randn(batch, N, device=DEVICE),
                    need_dbias=True)
    v, counts = torch.randn(11, N, device=DEVICE), torch.arange(11, device=DEVICE, dtype=torch.float32)
    parts = impl.mean_split(v, counts, torch.float16)  # (the interpreter truncates to bf16: fp16 here)
    torch.testing.assert_close(parts, backends.get("torch", "projector").mean_split(v, counts, torch.float16))


def test_fp16_per_sample_vector_keeps_its_precision(impl):
    """fp16 without a GradScaler: the backward's per-sample vector (dpooled / n) W2 at LLaVA-1.5 scale
    (lambda 0.1, B 32, n 576: |dpooled| ~ lambda / (B sqrt(4096)), |dpooled / n| ~ 1e-7, below fp16's
    smallest normal 6e-5) keeps fp32-like precision: the rows are scaled by powers of two before the
    split. Unscaled, the same split loses ~20% of the vector to fp16's subnormals."""
    from regap_fast.ops.projector import _vector_times

    B, D, K = 32, 256, 192
    dpooled = torch.randn(B, D, device=DEVICE) * (0.1 / (B * 64))
    counts = torch.full((B,), 576.0, device=DEVICE)
    counts[3], counts[5] = 1.0, 0.0  # one token: a 576x larger vector; none: a zero row
    w = (torch.randn(D, K, device=DEVICE) / 16).half()
    ref = torch.where(counts[:, None] > 0, dpooled.double() / counts.double().clamp(min=1)[:, None], 0) @ w.double()

    unscaled = (impl.mean_split(dpooled, counts, torch.float16).double() @ w.double()).view(2, B, K).sum(0)
    got = _vector_times(impl, dpooled, counts, w, B, torch.float16)
    per_row = lambda a: ((a.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-300))  # noqa: E731
    assert per_row(unscaled).max() > 0.05  # what the scaling is for
    assert got.dtype == torch.float32 and per_row(got)[counts > 0].max() < 1e-5, per_row(got).max()
    assert (got[5] == 0).all()
    # inside fp16's normal range the scaling changes nothing beyond rounding
    big = torch.randn(B, D, device=DEVICE) * 40
    ref = torch.where(counts[:, None] > 0, big.double() / counts.double().clamp(min=1)[:, None], 0) @ w.double()
    assert per_row(_vector_times(impl, big, counts, w, B, torch.float16))[counts > 0].max() < 1e-5


# --------------------------------------------------------------------------------------------------
# GPU: LLaVA-1.5-7B sizes and CUDA graphs
# --------------------------------------------------------------------------------------------------


@gpu_only
def test_projector_primitives_llava7b_bf16(impl):
    """LLaVA-1.5-7B: B = 32 images of 576 tokens, D = 4096, bf16, some images padded out entirely."""
    if impl.__name__.endswith("torch_backend"):
        pytest.skip("the torch backend's PyTorch ops are checked at small sizes")
    B, n, D = 32, 576, 4096
    M = B * n
    pre = (torch.randn(M, D, device=DEVICE) * 1.5).bfloat16()
    mask = sample_mask(M, n, p=1.0, empty=(3, 17))
    _check_forward(impl, pre, mask, n, B)
    _check_forward(impl, pre, None, n, B)
    dh = (torch.randn(M, D, device=DEVICE) * 1e-2).bfloat16()
    vec = torch.randn(B, D, device=DEVICE) * 1e-3
    _check_backward(impl, dh, pre, mask, n, vec, need_dbias=True)
    _check_backward(impl, dh, pre, None, n, None, need_dbias=True)


@gpu_only
def test_projector_primitives_cuda_graph(impl):
    """The passes (memset and finish kernels included) capture into a CUDA graph and replay."""
    pre = torch.randn(1153, 264, device=DEVICE).bfloat16()
    dh = torch.randn(1153, 264, device=DEVICE).bfloat16()
    vec = torch.randn(3, 264, device=DEVICE)
    counts = torch.tensor([500.0, 0.0, 77.0], device=DEVICE)
    mask = strided_row_mask(1153)

    def run():
        return (*impl.gelu_pool_forward(pre, mask, 577, 3, True), *impl.dgelu_backward(dh.clone(), pre, mask, 577,
                                                                                        vec, True),
                impl.mean_split(vec, counts, torch.bfloat16))

    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (plans, occupancy queries, Triton compiles)
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = run()
    g.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)
