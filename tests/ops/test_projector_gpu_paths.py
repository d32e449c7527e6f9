"""Every launch path of the projector family's CUDA and Triton passes, at shapes that reach it on the GPU
the test runs on, each against float64 (`pytest -m gpu`; skipped without a GPU).

csrc/projector.cu plans ``gelu_pool_forward`` from the SM count: about ``want = SMs x resident blocks x
2 / column strips`` row chunks (at most 8 resident blocks of 256 threads per SM), ``target = rows /
want`` rows per chunk (at least 8). A sample longer than ``target`` is cut into pieces; otherwise a
chunk is whole samples: one warp per sample for samples of <= 64 rows, else the block's 8 warps share
each sample. The shapes below are computed from the GPU's SM count so that each path is reached
whatever the occupancy (1 to 8 blocks per SM). Beyond the plans: a launch of more than 65,535 row
programs (CUDA's grid y limit: the CUDA kernels loop, Triton launches in parts) and element offsets
past 2^31 (a row-strided view, so only the rows read are allocated... and the gap between them).
"""

import pytest
import torch

from regap_fast import llava_projector
from regap_fast.reference import llava_projector_reference

from helpers import DEVICE, rel_err, requires_gpu
from test_gpu_pass import kernel_backends
from test_projector_primitives import _check_backward, _check_forward, sample_mask

pytestmark = [pytest.mark.gpu, requires_gpu]

BACKENDS = kernel_backends("projector")
MAX_RESIDENT = 8  # blocks of 256 threads per SM: 2048 threads
N = 256  # one column strip for 16-bit dtypes (32 lanes x 8), two for fp32


def _most_chunks(cols: int, dtype) -> int:
    """The most row chunks the CUDA forward plan can want for ``cols`` columns on this GPU."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    strips = -(-cols // (32 * 16 // torch.empty((), dtype=dtype).element_size()))
    return max(1, sms * MAX_RESIDENT * 2 // strips)


def _paths(rows_per_sample: int, batch: int, dtype=torch.bfloat16, masked=True):
    """One forward and one backward (with the per-sample vector and db) at [batch x rows_per_sample, N]."""
    def run(impl):
        M = batch * rows_per_sample
        pre = (torch.randn(M, N, device=DEVICE) * 2).to(dtype)
        mask = sample_mask(M, rows_per_sample, empty=(1,)) if masked else None
        _check_forward(impl, pre, mask, rows_per_sample, batch)
        vec = torch.randn(batch, N, device=DEVICE) * 0.3
        _check_backward(impl, torch.randn(M, N, device=DEVICE).to(dtype), pre, mask, rows_per_sample, vec,
                        need_dbias=True)
    return run


def _impl(backend):
    from regap_fast import backends

    return backends.get(backend, "projector")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_warp_per_sample_short_samples(backend, dtype):
    """Samples of <= 8 rows never exceed a chunk's target: the warp-per-sample kernel, one sample per warp."""
    _paths(5, 37, dtype)(_impl(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_warp_per_sample_at_64_rows(backend):
    """Samples of exactly 64 rows (the warp kernel's limit) with more samples than chunks wanted."""
    _paths(64, _most_chunks(N, torch.bfloat16) + 3)(_impl(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_samples_per_warp(backend):
    """Samples of 2 rows, so many that each chunk holds >= 16 samples: a warp pools several in turn."""
    _paths(2, 17 * _most_chunks(N, torch.bfloat16) + 5)(_impl(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_whole_samples_per_block(backend):
    """Samples of 80 rows (> 64: the block kernel) with >= 2 whole samples per chunk."""
    _paths(80, 2 * _most_chunks(N, torch.bfloat16) + 7)(_impl(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_cut_into_pieces(backend):
    """Three samples of 4000 rows: each longer than a chunk's target, cut into pieces, then summed."""
    _paths(4000, 3)(_impl(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_row_programs_than_the_grid_takes(backend):
    """65,573 samples of 2 rows through the whole op, forward and backward: more samples than a grid's
    y dimension takes (mean_split has one row program per sample; Triton's passes one per piece)."""
    B, n, Dv, D = 65_536 + 37, 2, 8, 16
    x = torch.randn(B, n, Dv, device=DEVICE)
    w1, w2 = torch.randn(D, Dv, device=DEVICE) / 3, torch.randn(D, D, device=DEVICE) / 4
    b1, b2 = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    im = torch.rand(B, n, device=DEVICE) < 0.8
    im[:, 0] = True
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    out, pooled = llava_projector(*leaves, im, backend=backend)
    probe_out, probe_pooled = torch.randn_like(out), torch.randn_like(pooled)
    got = torch.autograd.grad((out * probe_out).sum() + (pooled * probe_pooled).sum(), leaves)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    r_out, r_pooled = llava_projector_reference(*ref, image_mask=im)
    want = torch.autograd.grad((r_out * probe_out.double()).sum() + (r_pooled * probe_pooled.double()).sum(), ref)
    assert rel_err(out, r_out) < 3e-6 and rel_err(pooled, r_pooled) < 3e-6
    assert rel_err(pooled[-40:], r_pooled[-40:]) < 3e-6  # the samples past the first 65,535
    for name, g, w in zip(("x", "w1", "b1", "w2", "b2"), got, want):
        assert rel_err(g, w) < 3e-5, (name, rel_err(g, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_to_the_31(backend):
    """Rows 2^30 + 64 elements apart (one 4 GiB fp16 allocation, three rows used): the last row starts
    past element 2^31, where a 32-bit offset would wrap."""
    stride, rows = 2**30 + 64, 3
    base = torch.empty((rows - 1) * stride + N, device=DEVICE, dtype=torch.float16)
    pre = base.as_strided((rows, N), (stride, 1))
    pre.copy_(torch.randn(rows, N, device=DEVICE) * 2)
    impl = _impl(backend)
    mask = torch.tensor([True, False, True], device=DEVICE)
    _check_forward(impl, pre, mask, 1, rows)
    _check_forward(impl, pre, None, 2, 2)
    _check_backward(impl, torch.randn(rows, N, device=DEVICE).half(), pre, mask, 1,
                    torch.randn(rows, N, device=DEVICE) * 0.3, need_dbias=True)
    del base, pre
    torch.cuda.empty_cache()
