"""pooled_text_embeddings (the caption side from token ids: an embedding-bag mean) on every backend, and
its primitive ``gather_mean_forward`` against float64: odd sizes, views, empty captions, masked-out
tokens pointing at a NaN row that must never be read, determinism; GPU-sized cases on a GPU."""

import pytest
import torch
import torch.nn.functional as F

import regap_fast
from regap_fast import backends, pooled_text_embeddings

from helpers import DEVICE, all_backend_params, assert_sum_close, random_mask, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not GPU, reason="a GPU-sized case (slow in the Triton interpreter)")
BACKENDS = all_backend_params("text_pool")


@pytest.fixture(params=BACKENDS)
def text(request):
    return backends.get(request.param, "text_pool")


@pytest.mark.parametrize("backend", BACKENDS)
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


def test_errors():
    with pytest.raises(TypeError, match="input_ids"):
        pooled_text_embeddings(torch.zeros(2, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="must lie in"):
        pooled_text_embeddings(torch.full((2, 3), 5), torch.randn(5, 4))
    with pytest.raises(ValueError, match="caption_mask must have shape"):
        pooled_text_embeddings(torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 4),
                               torch.ones(2, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# the primitive: gather_mean_forward
# --------------------------------------------------------------------------------------------------




def gather_mean64(ids, weight, mask):
    rows = weight.double()[ids.long()]  # [B, T, D]
    B, T = ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE) if mask is None else mask
    rows = torch.where(valid[..., None], rows, 0.0)
    n = valid.sum(1)
    s = rows.sum(1)
    mag = rows.abs().sum(1)
    inv = torch.where(n > 0, 1.0 / n.clamp(min=1).float(), torch.zeros((), device=DEVICE))
    mean = s * inv.double()[:, None]
    return mean, mag * inv.double()[:, None], inv


def _check_gather(text, ids, weight, mask):
    mean, inv = text.gather_mean_forward(ids, weight, mask)
    B, D = ids.shape[0], weight.shape[1]
    assert mean.dtype == inv.dtype == torch.float32 and mean.shape == (B, D) and inv.shape == (B,)
    ref, mag, ref_inv = gather_mean64(ids, weight, mask)
    assert torch.equal(inv, ref_inv), "inv_count"
    assert_sum_close(mean, ref, mag, "mean", rel=2e-5)
    assert (mean[ref_inv == 0] == 0).all()
    return mean, inv


# (B, T, V, D): D = 1, T = 1, T not a multiple of anything, B = 1 with long captions (token chunks
# and the finish kernel), B over the 65535 grid limit, LLaVA's B = 32 captions of 64 tokens, D = 4096
GATHER_SIZES = [(1, 1, 1, 1), (4, 9, 37, 19), (3, 33, 50, 70), pytest.param((1, 5000, 1000, 256), marks=gpu_only),
                pytest.param((2, 3000, 64, 8), marks=gpu_only), pytest.param((70000, 2, 50, 8), marks=gpu_only),
                pytest.param((32, 64, 32000, 4096), marks=gpu_only)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", GATHER_SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_gather_mean_forward(text, dtype, size, masked, id_dtype):
    B, T, V, D = size
    weight = torch.randn(V + 1, D, device=DEVICE).to(dtype)
    weight[V] = float("nan")  # the row that masked-out tokens point to: it must never be read
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    mask = random_mask(B, T, DEVICE, p=0.7, empty_rows=(0,) if B > 1 else ()) if masked else None
    if mask is not None:
        ids[~mask] = V
    _check_gather(text, ids.to(id_dtype), weight, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["offset", "colstride", "transposed", "ids_view", "mask_view"])
def test_gather_mean_forward_views(text, dtype, how):
    B, T, V, D = 5, 41, 300, 72
    weight = torch.randn(V, D, device=DEVICE).to(dtype)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    mask = random_mask(B, T, DEVICE, empty_rows=(2,))
    if how == "offset":
        weight = torch.cat([torch.zeros(1, device=DEVICE, dtype=dtype), weight.reshape(-1)])[1:].view(V, D)
    elif how == "colstride":
        weight = torch.randn(V, 2 * D, device=DEVICE).to(dtype)[:, ::2]
    elif how == "transposed":
        weight = torch.randn(D, V, device=DEVICE).to(dtype).t()
    elif how == "ids_view":
        ids = torch.randint(0, V, (T, B), device=DEVICE).t()
    elif how == "mask_view":
        mask = (torch.rand(B, 2 * T, device=DEVICE) < 0.6)[:, ::2]
    _check_gather(text, ids, weight, mask)


def test_gather_mean_forward_edges(text):
    w = torch.randn(10, 6, device=DEVICE)
    mean, inv = text.gather_mean_forward(torch.zeros(3, 0, dtype=torch.long, device=DEVICE), w, None)
    assert (mean == 0).all() and (inv == 0).all()
    mean, inv = text.gather_mean_forward(torch.zeros(2, 5, dtype=torch.long, device=DEVICE),
                                         torch.randn(10, 0, device=DEVICE),
                                         torch.ones(2, 5, dtype=torch.bool, device=DEVICE))
    assert mean.shape == (2, 0) and torch.equal(inv, torch.full((2,), 0.2, device=DEVICE))
    mean, inv = text.gather_mean_forward(torch.zeros(0, 5, dtype=torch.long, device=DEVICE), w, None)
    assert mean.shape == (0, 6) and inv.shape == (0,)


def test_gather_mean_forward_deterministic(text):
    weight = torch.randn(1000, 256, device=DEVICE).bfloat16()
    ids = torch.randint(0, 1000, (1, 5000 if GPU else 300), device=DEVICE)
    a = text.gather_mean_forward(ids, weight, None)
    b = text.gather_mean_forward(ids, weight, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
