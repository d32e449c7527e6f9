"""Triton kernels of the ``projector`` family: the memory-bound passes around the projector's cuBLAS GEMMs.

The GEMMs are cuBLAS (``regap_fast.ops.projector`` calls them through torch); each kernel here is the
one elementwise pass that follows a GEMM anyway, with REGAP's work folded into it:

``gelu_pool_forward``  h = GELU(pre) (exact erf, fp32 math) and, in the same pass, the per-sample sums
                       of the valid rows of the *stored* h: REGAP's pooled hidden state.
``dgelu_backward``     dpre = (dh + vec[sample] on valid rows) * GELU'(pre), written over dh, and the
                       column sums of the stored dpre (db1): REGAP's broadcast gradient in the pass.
``mean_split``         v / n per sample as hi/lo rows of the compute dtype: how the fp32 pooled vector
                       meets W2 in a 16-bit GEMM with fp32 output (no fp32 copy of W2).

Rows are the flattened ``B * Ni`` image tokens; row r belongs to sample ``r // Ni``. A program owns a
strip of columns and a run of rows inside one sample (a "piece"), so its sums never mix samples;
pieces are summed afterwards in a fixed order. No atomics: bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import INTERPRETED, target_programs

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    return cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _piece_rows(pid_r, M, sample_rows, piece_rows, pieces):
    """(first row, end row, sample) of the piece ``pid_r``: piece ``pid_r % pieces`` of its sample."""
    sample = pid_r // pieces
    start = sample.to(tl.int64) * sample_rows + (pid_r % pieces).to(tl.int64) * piece_rows
    end = tl.minimum(tl.minimum(start + piece_rows, (sample.to(tl.int64) + 1) * sample_rows), M)
    return start, end, sample


@triton.jit
def _tile(r0, end, cols, col_ok, BLOCK_M: tl.constexpr):
    """The rows of the tile starting at r0 (int64), which of them are < end, and the tile's [M, N] mask."""
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < end
    return rows, row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _load(ptr, rows, stride, cols, ok):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _valid_rows(rows, row_ok, mask_ptr, mask_stride, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return row_ok & (tl.load(mask_ptr + rows * mask_stride, mask=row_ok, other=0) != 0)
    return row_ok


@triton.jit
def _gelu_pool_kernel(
    pre_ptr, h_ptr, part_ptr, mask_ptr, M, N, sample_rows, piece_rows, pieces, pool_pieces,
    stride_pre, stride_h, mask_stride, first_piece,
    POOL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (column strips, pieces from ``first_piece``). Stores h; with POOL, the piece's column sums
    of the valid rows of the stored h go to ``part[pid_r]`` (pieces >= pool_pieces, of samples past the
    batch, are not pooled)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1) + first_piece
    start, end, _ = _piece_rows(pid_r, M, sample_rows, piece_rows, pieces)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows, row_ok, ok = _tile(r0, end, cols, col_ok, BLOCK_M)
        h = _gelu(_load(pre_ptr, rows, stride_pre, cols, ok)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=ok)
        if POOL:
            valid = _valid_rows(rows, row_ok, mask_ptr, mask_stride, HAS_MASK)
            acc += tl.where(valid[:, None], h.to(tl.float32), 0.0)  # the rounded h, as stored
    if POOL:
        if pid_r < pool_pieces:
            tl.store(part_ptr + pid_r.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _dgelu_kernel(
    dh_ptr, pre_ptr, dpre_ptr, vec_ptr, mask_ptr, part_ptr, M, N, sample_rows, piece_rows, pieces, vec_rows,
    stride_dh, stride_pre, stride_dpre, stride_vec_b, stride_vec_n, mask_stride, first_piece,
    HAS_VEC: tl.constexpr, HAS_MASK: tl.constexpr, DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (column strips, pieces from ``first_piece``). dpre = (dh + vec[sample] on valid rows) *
    GELU'(pre); with DBIAS, the piece's column sums of the stored dpre go to ``part[pid_r]``. dpre may
    be dh (in place: each element is read, then written, by the same program)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1) + first_piece
    start, end, sample = _piece_rows(pid_r, M, sample_rows, piece_rows, pieces)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_VEC:
        v = tl.load(vec_ptr + sample.to(tl.int64) * stride_vec_b + cols * stride_vec_n,
                    mask=col_ok & (sample < vec_rows), other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows, row_ok, ok = _tile(r0, end, cols, col_ok, BLOCK_M)
        d = _load(dh_ptr, rows, stride_dh, cols, ok)
        x = _load(pre_ptr, rows, stride_pre, cols, ok)
        if HAS_VEC:
            valid = _valid_rows(rows, row_ok, mask_ptr, mask_stride, HAS_MASK)
            d += tl.where(valid[:, None], v[None, :], 0.0)
        y = (d * _gelu_grad(x)).to(dpre_ptr.dtype.element_ty)
        tl.store(dpre_ptr + rows[:, None] * stride_dpre + cols[None, :], y, mask=ok)
        if DBIAS:
            acc += tl.where(ok, y.to(tl.float32), 0.0)  # the rounded dpre, as stored
    if DBIAS:
        tl.store(part_ptr + pid_r.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _mean_split_kernel(v_ptr, n_ptr, out_ptr, B, N, stride_v, first_row, HAS_COUNTS: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (column strips, rows from ``first_row``): x = v[b] / n[b] (correctly rounded, 0 for n = 0;
    v[b] without counts); out[b] = dtype(x) and, with SPLIT, out[B + b] = dtype(x - out[b])."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64) + first_row
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(v_ptr + b * stride_v + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_COUNTS:
        n = tl.load(n_ptr + b).to(tl.float32)
        x = tl.where(n > 0, tl.math.div_rn(x, tl.maximum(n, 1.0)), 0.0)
    hi = x.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * N + cols, hi, mask=ok)
    if SPLIT:
        tl.store(out_ptr + (B + b) * N + cols, (x - hi.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


# CUDA's limit on a grid's y dimension: a launch of more row programs is split into several.
MAX_GRID_Y = 65535


def _launch(kernel, strips: int, programs: int, *args, **meta) -> None:
    """``kernel[(strips, programs)](*args, first, **meta)``, as launches of at most MAX_GRID_Y row
    programs, each told its first row program ``first`` (the argument after ``args``)."""
    for first in range(0, programs, MAX_GRID_Y):
        kernel[(strips, min(MAX_GRID_Y, programs - first))](*args, first, **meta)


def _blocks(N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 32 x 128 elements per tile on a GPU; bigger tiles, fewer steps, when interpreted."""
    block_n = min(triton.next_power_of_2(max(N, 16)), 128)
    return (64 if INTERPRETED else 32), block_n


def _pieces(M: int, sample_rows: int, strips: int, block_m: int, device) -> tuple[int, int, int]:
    """(samples, piece_rows, pieces): each sample cut into enough pieces of whole row tiles to fill the grid."""
    samples = triton.cdiv(M, sample_rows)
    want = max(1, target_programs(device) // max(1, samples * strips))
    piece_rows = triton.cdiv(triton.cdiv(sample_rows, want), block_m) * block_m
    return samples, piece_rows, triton.cdiv(sample_rows, piece_rows)


def _row_mask(mask_flat: torch.Tensor | None, like: torch.Tensor):
    return (like, 0) if mask_flat is None else (mask_flat.view(torch.uint8), mask_flat.stride(0))


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def gelu_pool_forward(pre, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """h = GELU(pre) [M, N] in pre's dtype and, with ``pool``, pooled_sum [batch, N] fp32 (sums of the
    valid rows of the stored h, row r in sample r // rows_per_sample; None without ``pool``)."""
    pre = _unit_column_stride(pre)
    M, N = pre.shape
    h = torch.empty((M, N), device=pre.device, dtype=pre.dtype)
    if M == 0 or N == 0:
        return h, (torch.zeros((batch, N), device=pre.device, dtype=torch.float32) if pool else None)
    block_m, block_n = _blocks(N)
    strips = triton.cdiv(N, block_n)
    samples, piece_rows, pieces = _pieces(M, rows_per_sample if pool else M, strips, block_m, pre.device)
    pooled_samples = min(samples, batch) if pool else 0
    part = torch.empty((max(pooled_samples, 1) * pieces, N), device=pre.device, dtype=torch.float32)
    mask, mask_stride = _row_mask(mask_flat, pre)
    _launch(
        _gelu_pool_kernel, strips, samples * pieces,
        pre, h, part, mask, M, N, rows_per_sample if pool else M, piece_rows, pieces, pooled_samples * pieces,
        pre.stride(0), h.stride(0), mask_stride,
        POOL=pool, HAS_MASK=mask_flat is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    if not pool:
        return h, None
    sums = part[:pooled_samples * pieces].view(pooled_samples, pieces, N)
    pooled = sums[:, 0] if pieces == 1 else sums.sum(1)
    if pooled_samples < batch:  # samples that own no row pool to zero
        pooled = torch.cat([pooled, pooled.new_zeros((batch - pooled_samples, N))])
    return h, pooled


def dgelu_backward(dh, pre, mask_flat, rows_per_sample: int, vec, need_dbias: bool):
    """dpre = (dh + vec[r // rows_per_sample] on valid rows) * GELU'(pre), written over dh when dh is
    contiguous, and db = the column sums of the stored dpre ([N] fp32, or None). Returns (dpre, db)."""
    pre = _unit_column_stride(pre)
    M, N = pre.shape
    dpre = dh if dh.is_contiguous() else torch.empty_like(pre)
    if M == 0 or N == 0:
        return dpre, (torch.zeros((N,), device=pre.device, dtype=torch.float32) if need_dbias else None)
    dh = _unit_column_stride(dh)
    block_m, block_n = _blocks(N)
    strips = triton.cdiv(N, block_n)
    samples, piece_rows, pieces = _pieces(M, rows_per_sample if vec is not None else M, strips, block_m,
                                          pre.device)
    part = torch.empty((samples * pieces if need_dbias else 1, N), device=pre.device, dtype=torch.float32)
    mask, mask_stride = _row_mask(mask_flat, pre)
    v = vec if vec is not None else part
    _launch(
        _dgelu_kernel, strips, samples * pieces,
        dh, pre, dpre, v, mask, part, M, N, rows_per_sample if vec is not None else M, piece_rows, pieces,
        vec.shape[0] if vec is not None else 0,
        dh.stride(0), pre.stride(0), dpre.stride(0), v.stride(0), v.stride(1), mask_stride,
        HAS_VEC=vec is not None, HAS_MASK=mask_flat is not None, DBIAS=need_dbias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return dpre, (part.sum(0) if need_dbias else None)


def mean_split(v, counts, dtype: torch.dtype):
    """The hi/lo rows (``[2B, N]`` in ``dtype``; ``[B, N]`` for fp32) of ``v / counts`` (``v`` itself when
    counts is None), one launch."""
    v = v.contiguous()
    B, N = v.shape
    split = dtype in (torch.float16, torch.bfloat16)
    out = torch.empty(((2 if split else 1) * B, N), device=v.device, dtype=dtype)
    if B == 0 or N == 0:
        return out
    block_n = min(triton.next_power_of_2(max(N, 16)), 1024)
    _launch(
        _mean_split_kernel, triton.cdiv(N, block_n), B,
        v, counts if counts is not None else v, out, B, N, v.stride(0),
        HAS_COUNTS=counts is not None, SPLIT=split, BLOCK_N=block_n, num_warps=4,
    )
    return out
