"""Triton kernels for masked mean pooling and the REGAP gap loss.

Installed as ``regap_fast.kernels.gap_loss`` (the top-level ``kernels/`` folder is mapped into the
``regap_fast`` namespace by setup.py; it is not a top-level package of its own).

Pass structure (docs/design.md, "The gap loss"):

forward   1. ``_pool_partial_kernel``  reads every valid token of both sides once and writes fp32
             partial sums ``[B, S, D]`` (``S`` token chunks per sample, so that small batches still
             fill the GPU);
          2. ``_gap_finish_kernel``    one program per sample: means, the distance, ``dgap/ddiff``;
          3. ``_gap_reduce_kernel``    one program: the mean/sum over valid samples (not for "none").
backward  ``_broadcast_rows_kernel`` writes ``coef[b] * v[b, :]`` to every valid row of a sample, once.
          A side without a mask gets a ``[B, 1, D]`` vector that the caller expands (no dense pass).

Every kernel takes arbitrary strides; masked-out tokens are never loaded, so garbage (even NaN) in
padding cannot leak into the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from regap_fast.contracts import BroadcastSide

from .runtime import INTERPRETED, target_programs  # noqa: F401  (INTERPRETED: read by regap_fast.backends)

# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _pool_chunk(
    x_ptr, m_ptr, part_ptr, b, pid_d, chunk, n_tokens, n_dim, chunk_tokens,
    stride_xb, stride_xn, stride_xd, stride_mb, stride_mn, stride_pb, stride_ps,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the valid rows of one token chunk of sample ``b`` over one block of columns."""
    b64 = b.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_dim
    x_base = x_ptr + b64 * stride_xb + cols.to(tl.int64) * stride_xd
    # a 2-D accumulator: the rows are summed once at the end, not with a cross-warp reduction per tile
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = chunk * chunk_tokens
    for n0 in range(start, start + chunk_tokens, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        if HAS_MASK:
            row_ok = row_ok & (tl.load(m_ptr + b64 * stride_mb + rows * stride_mn, mask=row_ok, other=0) != 0)
        tile = tl.load(
            x_base[None, :] + rows.to(tl.int64)[:, None] * stride_xn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tile.to(tl.float32)
    tl.store(part_ptr + b64 * stride_pb + chunk * stride_ps + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _pool_partial_kernel(
    a_ptr, am_ptr, t_ptr, tm_ptr, part_ptr,
    n_a, n_t, n_dim, chunk_tokens, chunks_a,
    stride_ab, stride_an, stride_ad, stride_amb, stride_amn,
    stride_tb, stride_tn, stride_td, stride_tmb, stride_tmn,
    stride_pb, stride_ps,
    A_MASK: tl.constexpr, T_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (D blocks, chunks of side a + chunks of side t, B): one launch pools both sides.

    Partial sums of side a land in ``part[:, :chunks_a]``, those of side t in ``part[:, chunks_a:]``.
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    if pid_s < chunks_a:
        _pool_chunk(a_ptr, am_ptr, part_ptr, b, pid_d, pid_s, n_a, n_dim, chunk_tokens,
                    stride_ab, stride_an, stride_ad, stride_amb, stride_amn, stride_pb, stride_ps,
                    A_MASK, BLOCK_N, BLOCK_D)
    else:
        _pool_chunk(t_ptr, tm_ptr, part_ptr + chunks_a * stride_ps, b, pid_d, pid_s - chunks_a,
                    n_t, n_dim, chunk_tokens,
                    stride_tb, stride_tn, stride_td, stride_tmb, stride_tmn, stride_pb, stride_ps,
                    T_MASK, BLOCK_N, BLOCK_D)


@triton.jit
def _valid_count(m_ptr, b, n_tokens, stride_mb, stride_mn, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """The number of valid tokens of sample b (fp32; exact below 2^24)."""
    if HAS_MASK:
        cnt = tl.zeros([BLOCK], dtype=tl.int32)
        for n0 in range(0, n_tokens, BLOCK):
            rows = n0 + tl.arange(0, BLOCK)
            m = tl.load(m_ptr + b.to(tl.int64) * stride_mb + rows * stride_mn, mask=rows < n_tokens, other=0)
            cnt += (m != 0).to(tl.int32)
        n = tl.sum(cnt, axis=0).to(tl.float32)
    else:
        # n_tokens may arrive as a compile-time constant (Triton specialises 1): make it a tensor
        n = tl.max(tl.zeros([1], dtype=tl.float32) + n_tokens, axis=0)
    return n


@triton.jit
def _inv_or_zero(n):
    return tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0)


@triton.jit
def _mean_from_sum(s, n):
    """s / n, correctly rounded (not s * (1/n), and not Triton's approximate fp32 `/`), 0 for n = 0:
    the one formula for a mean on every backend (regap_fast.reference.mean_from_sum)."""
    return tl.where(n > 0, tl.math.div_rn(s, tl.maximum(n, 1.0)), 0.0)


@triton.jit
def _gap_finish_kernel(
    part_ptr, am_ptr, tm_ptr, dir_ptr, gap_ptr, stats_ptr,
    n_a, n_t, n_dim, chunks_a, chunks_t, n_batch,
    stride_pb, stride_ps, stride_amb, stride_amn, stride_tmb, stride_tmn,
    A_MASK: tl.constexpr, T_MASK: tl.constexpr, SQUARED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program per sample: mu_a - mu_t, the gap, and dgap/d(mu_a - mu_t) for the backward.

    stats rows: 0 = 1/n_a, 1 = 1/n_t (0 when the side is empty), 2 = 1 if the sample counts else 0.
    """
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    cnt_a = _valid_count(am_ptr, b, n_a, stride_amb, stride_amn, A_MASK, BLOCK_M)
    cnt_t = _valid_count(tm_ptr, b, n_t, stride_tmb, stride_tmn, T_MASK, BLOCK_M)
    valid = (cnt_a > 0) & (cnt_t > 0)
    sumsq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, n_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < n_dim
        sa = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(0, chunks_a):
            sa += tl.load(part_ptr + b64 * stride_pb + s * stride_ps + cols, mask=ok, other=0.0)
        st = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(chunks_a, chunks_a + chunks_t):
            st += tl.load(part_ptr + b64 * stride_pb + s * stride_ps + cols, mask=ok, other=0.0)
        # two correctly rounded means: equal means give exactly 0 (a zero gap, zero gradient)
        diff = tl.where(valid, _mean_from_sum(sa, cnt_a) - _mean_from_sum(st, cnt_t), 0.0)
        sumsq += diff * diff
        # stash the raw difference; it is turned into the direction below
        tl.store(dir_ptr + b64 * n_dim + cols, diff, mask=ok)
    sq = tl.sum(sumsq, axis=0)
    if SQUARED:
        gap = sq
        scale = 2.0
    else:
        gap = tl.sqrt(sq)
        scale = tl.where(gap > 0, 1.0 / tl.where(gap > 0, gap, 1.0), 0.0)
    # the same program wrote these columns above, so reading them back needs no barrier
    for d0 in range(0, n_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < n_dim
        diff = tl.load(dir_ptr + b64 * n_dim + cols, mask=ok, other=0.0)
        tl.store(dir_ptr + b64 * n_dim + cols, diff * scale, mask=ok)
    tl.store(gap_ptr + b, gap)
    tl.store(stats_ptr + b, _inv_or_zero(cnt_a))
    tl.store(stats_ptr + n_batch + b, _inv_or_zero(cnt_t))
    tl.store(stats_ptr + 2 * n_batch + b, valid.to(tl.float32))


@triton.jit
def _gap_reduce_kernel(gap_ptr, stats_ptr, loss_ptr, n_batch, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: sum (or mean over valid samples) of the per-sample gaps, in a fixed order.

    For the mean, row 2 of stats becomes valid / n_valid: the per-sample weight of the backward.
    """
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, n_batch, BLOCK):
        idx = b0 + tl.arange(0, BLOCK)
        ok = idx < n_batch
        total += tl.load(gap_ptr + idx, mask=ok, other=0.0)
        count += tl.load(stats_ptr + 2 * n_batch + idx, mask=ok, other=0.0)
    total_s = tl.sum(total, axis=0)
    if MEAN:
        inv = 1.0 / tl.maximum(tl.sum(count, axis=0), 1.0)
        tl.store(loss_ptr, total_s * inv)
        for b0 in range(0, n_batch, BLOCK):
            idx = b0 + tl.arange(0, BLOCK)
            ok = idx < n_batch
            w = tl.load(stats_ptr + 2 * n_batch + idx, mask=ok, other=0.0)
            tl.store(stats_ptr + 2 * n_batch + idx, w * inv, mask=ok)
    else:
        tl.store(loss_ptr, total_s)


@triton.jit
def _broadcast_chunk(
    out_ptr, m_ptr, v_ptr, b, pid_d, chunk, coef, n_rows, n_dim, chunk_tokens,
    stride_ob, stride_on, stride_od, stride_mb, stride_mn, stride_vb, stride_vd,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b64 = b.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_dim
    vec = tl.load(v_ptr + b64 * stride_vb + cols * stride_vd, mask=col_ok, other=0.0).to(tl.float32) * coef
    vec = vec.to(out_ptr.dtype.element_ty)
    o_base = out_ptr + b64 * stride_ob + cols.to(tl.int64) * stride_od
    start = chunk * chunk_tokens
    for n0 in range(start, start + chunk_tokens, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=out_ptr.dtype.element_ty) + vec[None, :]
        if HAS_MASK:
            keep = tl.load(m_ptr + b64 * stride_mb + rows * stride_mn, mask=row_ok, other=0) != 0
            tile = tl.where(keep[:, None], tile, tl.zeros_like(tile))
        tl.store(o_base[None, :] + rows.to(tl.int64)[:, None] * stride_on, tile,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _broadcast_rows_kernel(
    oa_ptr, am_ptr, ot_ptr, tm_ptr, v_ptr, g_ptr, w_ptr, inv_a_ptr, inv_t_ptr,
    n_a, n_t, n_dim, chunk_tokens, chunks_a,
    stride_oab, stride_oan, stride_oad, stride_amb, stride_amn,
    stride_otb, stride_otn, stride_otd, stride_tmb, stride_tmn,
    stride_vb, stride_vd, stride_g, stride_w,
    SIGN_A: tl.constexpr, SIGN_T: tl.constexpr, A_MASK: tl.constexpr, T_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (D blocks, chunks of a + chunks of t, B). Writes, for each valid row n of sample b,

        out_a[b, n] = SIGN_A * g[b] * w[b] * inv_a[b] * v[b] (side a)
        out_t[b, n] = SIGN_T * g[b] * w[b] * inv_t[b] * v[b] (side t)

    and zero for masked-out rows. A side with no mask is given as a [B, 1, D] output (n = 1).
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    base = tl.load(g_ptr + b * stride_g).to(tl.float32) * tl.load(w_ptr + b * stride_w)
    if pid_s < chunks_a:
        coef = SIGN_A * base * tl.load(inv_a_ptr + b)
        _broadcast_chunk(oa_ptr, am_ptr, v_ptr, b, pid_d, pid_s, coef, n_a, n_dim, chunk_tokens,
                         stride_oab, stride_oan, stride_oad, stride_amb, stride_amn, stride_vb, stride_vd,
                         A_MASK, BLOCK_N, BLOCK_D)
    else:
        coef = SIGN_T * base * tl.load(inv_t_ptr + b)
        _broadcast_chunk(ot_ptr, tm_ptr, v_ptr, b, pid_d, pid_s - chunks_a, coef, n_t, n_dim, chunk_tokens,
                         stride_otb, stride_otn, stride_otd, stride_tmb, stride_tmn, stride_vb, stride_vd,
                         T_MASK, BLOCK_N, BLOCK_D)


@triton.jit
def _mean_finish_kernel(
    part_ptr, m_ptr, out_ptr, inv_ptr, n_tokens, n_dim, chunks,
    stride_pb, stride_ps, stride_mb, stride_mn,
    HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (D blocks, B): out[b] = sum of the partial sums * 1/n (0 for an empty row)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cnt = _valid_count(m_ptr, b, n_tokens, stride_mb, stride_mn, HAS_MASK, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < n_dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, chunks):
        acc += tl.load(part_ptr + b.to(tl.int64) * stride_pb + s * stride_ps + cols, mask=ok, other=0.0)
    tl.store(out_ptr + b.to(tl.int64) * n_dim + cols, _mean_from_sum(acc, cnt), mask=ok)
    if pid_d == 0:
        tl.store(inv_ptr + b, _inv_or_zero(cnt))


@triton.jit
def _gather_mean_kernel(
    ids_ptr, w_ptr, m_ptr, out_ptr, inv_ptr, n_tokens, n_dim,
    stride_ib, stride_it, stride_wv, stride_wd, stride_mb, stride_mt,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (D blocks, B): out[b] = mean of the embedding rows w[ids[b, t]] over valid t (an
    embedding-bag): the caption embeddings [B, Nt, D] are never materialised."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_dim
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, n_tokens, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok = ts < n_tokens
        if HAS_MASK:
            ok = ok & (tl.load(m_ptr + b * stride_mb + ts * stride_mt, mask=ok, other=0) != 0)
        ids = tl.load(ids_ptr + b * stride_ib + ts * stride_it, mask=ok, other=0).to(tl.int64)
        rows = tl.load(w_ptr + ids[:, None] * stride_wv + cols[None, :] * stride_wd,
                       mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += rows.to(tl.float32)
        cnt += ok.to(tl.int32)
    n = tl.sum(cnt, axis=0).to(tl.float32)
    tl.store(out_ptr + b * n_dim + cols, _mean_from_sum(tl.sum(acc, axis=0), n), mask=col_ok)
    if pid_d == 0:
        tl.store(inv_ptr + b, _inv_or_zero(n))


# --------------------------------------------------------------------------------------------------
# host side: launch configuration
# --------------------------------------------------------------------------------------------------

def _block_d(n_dim: int, elem_size: int) -> int:
    # 512 bytes of a row per program: 16-byte vectors for a full warp, enough bytes in flight
    return max(16, min(triton.next_power_of_2(n_dim), 512 // elem_size))


def _chunking(n_batch: int, n_dblocks: int, token_counts: tuple[int, ...], block_n: int,
              device) -> tuple[int, list[int]]:
    """Token chunk length (a multiple of block_n) so that the grid has enough programs."""
    per_sample = max(1, target_programs(device) // max(1, n_batch * n_dblocks))
    total = max(1, sum(token_counts))
    chunk = triton.cdiv(triton.cdiv(total, per_sample), block_n) * block_n
    chunk = max(block_n, chunk)
    return chunk, [max(1, triton.cdiv(n, chunk)) for n in token_counts]


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """A bool mask as a zero-copy uint8 view with its strides, or a dummy pointer."""
    if mask is None:
        return like, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


_BLOCK_N = 32
_FINISH_BLOCK_D = 1024
_COUNT_BLOCK = 1024


def gap_loss_forward(image_embeds, caption_embeds, image_mask, caption_mask, reduction: str, squared: bool):
    """Forward of the gap loss. Returns (loss, direction [B, D] fp32, stats [3, B] fp32)."""
    B, n_i, D = image_embeds.shape
    n_t = caption_embeds.shape[1]
    dev = image_embeds.device
    block_d = _block_d(D, image_embeds.element_size())
    n_dblocks = triton.cdiv(D, block_d)
    chunk, (chunks_i, chunks_t) = _chunking(B, n_dblocks, (n_i, n_t), _BLOCK_N, dev)
    part = torch.empty((B, chunks_i + chunks_t, D), device=dev, dtype=torch.float32)
    im, s_imb, s_imn, i_has = _mask_args(image_mask, image_embeds)
    tm, s_tmb, s_tmn, t_has = _mask_args(caption_mask, caption_embeds)
    _pool_partial_kernel[(n_dblocks, chunks_i + chunks_t, B)](
        image_embeds, im, caption_embeds, tm, part,
        n_i, n_t, D, chunk, chunks_i,
        *image_embeds.stride(), s_imb, s_imn,
        *caption_embeds.stride(), s_tmb, s_tmn,
        part.stride(0), part.stride(1),
        A_MASK=i_has, T_MASK=t_has, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        num_warps=4,
    )
    direction = torch.empty((B, D), device=dev, dtype=torch.float32)
    gaps = torch.empty((B,), device=dev, dtype=torch.float32)
    stats = torch.empty((3, B), device=dev, dtype=torch.float32)
    _gap_finish_kernel[(B,)](
        part, im, tm, direction, gaps, stats,
        n_i, n_t, D, chunks_i, chunks_t, B,
        part.stride(0), part.stride(1), s_imb, s_imn, s_tmb, s_tmn,
        A_MASK=i_has, T_MASK=t_has, SQUARED=squared,
        BLOCK_D=min(_FINISH_BLOCK_D, triton.next_power_of_2(D)), BLOCK_M=_COUNT_BLOCK,
        num_warps=4,
    )
    if reduction == "none":
        return gaps, direction, stats
    loss = torch.empty((), device=dev, dtype=torch.float32)
    _gap_reduce_kernel[(1,)](gaps, stats, loss, B, MEAN=(reduction == "mean"), BLOCK=1024, num_warps=4)
    return loss, direction, stats


def broadcast_rows(v, g, w, side_a: BroadcastSide | None, side_t: BroadcastSide | None, dtype: torch.dtype):
    """For each ``BroadcastSide``: out[b, n] = sign g[b] w[b] inv[b] v[b] on valid rows, 0 elsewhere.

    g and w are [B] or 0-d (broadcast) fp32 tensors. A side with no mask is returned as [B, 1, D]
    (the caller expands it); a side given as None as None.
    """
    B, D = v.shape
    dev = v.device

    def output(side):
        if side is None:
            return None, 0
        rows = side.rows if side.mask is not None else 1
        return torch.empty((B, rows, D), device=dev, dtype=dtype), rows

    out_a, rows_a = output(side_a)
    out_t, rows_t = output(side_t)
    if side_a is None and side_t is None:
        return out_a, out_t
    block_d = _block_d(D, torch.empty((), dtype=dtype).element_size())
    n_dblocks = triton.cdiv(D, block_d)
    chunk, (chunks_a, chunks_t) = _chunking(B, n_dblocks, (rows_a, rows_t), _BLOCK_N, dev)
    chunks_a = chunks_a if side_a is not None else 0
    chunks_t = chunks_t if side_t is not None else 0
    oa = out_a if out_a is not None else v
    ot = out_t if out_t is not None else v
    am, s_amb, s_amn, a_has = _mask_args(side_a.mask if side_a is not None else None, v)
    tm, s_tmb, s_tmn, t_has = _mask_args(side_t.mask if side_t is not None else None, v)
    inv_a = side_a.inv if side_a is not None else v
    inv_t = side_t.inv if side_t is not None else v
    _broadcast_rows_kernel[(n_dblocks, chunks_a + chunks_t, B)](
        oa, am, ot, tm, v, g, w, inv_a, inv_t,
        rows_a, rows_t, D, chunk, chunks_a,
        *(oa.stride() if out_a is not None else (0, 0, 0)), s_amb, s_amn,
        *(ot.stride() if out_t is not None else (0, 0, 0)), s_tmb, s_tmn,
        v.stride(0), v.stride(1), g.stride(0) if g.dim() else 0, w.stride(0) if w.dim() else 0,
        SIGN_A=side_a.sign if side_a is not None else 1.0, SIGN_T=side_t.sign if side_t is not None else 1.0,
        A_MASK=a_has, T_MASK=t_has,
        BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=4,
    )
    return out_a, out_t


def masked_mean_forward(x, mask):
    """Masked mean over tokens. Returns (mean [B, D] fp32, inv_count [B] fp32)."""
    B, N, D = x.shape
    dev = x.device
    block_d = _block_d(D, x.element_size())
    n_dblocks = triton.cdiv(D, block_d)
    chunk, (chunks,) = _chunking(B, n_dblocks, (N,), _BLOCK_N, dev)
    part = torch.empty((B, chunks, D), device=dev, dtype=torch.float32)
    m, s_mb, s_mn, has = _mask_args(mask, x)
    # side t is empty: zero chunks of it are launched
    _pool_partial_kernel[(n_dblocks, chunks, B)](
        x, m, x, m, part,
        N, 0, D, chunk, chunks,
        *x.stride(), s_mb, s_mn,
        *x.stride(), s_mb, s_mn,
        part.stride(0), part.stride(1),
        A_MASK=has, T_MASK=has, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        num_warps=4,
    )
    out = torch.empty((B, D), device=dev, dtype=torch.float32)
    inv = torch.empty((B,), device=dev, dtype=torch.float32)
    fin_block = min(_FINISH_BLOCK_D, triton.next_power_of_2(D))
    _mean_finish_kernel[(triton.cdiv(D, fin_block), B)](
        part, m, out, inv, N, D, chunks,
        part.stride(0), part.stride(1), s_mb, s_mn,
        HAS_MASK=has, BLOCK_D=fin_block, BLOCK_M=_COUNT_BLOCK,
        num_warps=4,
    )
    return out, inv


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D] fp32, inv_count [B] fp32)."""
    B, T = ids.shape
    D = weight.shape[1]
    out = torch.empty((B, D), device=weight.device, dtype=torch.float32)
    if D == 0:  # no column programs to launch: the counts alone
        n = torch.full((B,), float(T), device=weight.device) if mask is None else mask.sum(1, dtype=torch.float32)
        return out, torch.where(n > 0, 1.0 / n.clamp(min=1), 0.0)
    inv = torch.empty((B,), device=weight.device, dtype=torch.float32)
    block_d = _block_d(D, weight.element_size())
    m, s_mb, s_mt, has = _mask_args(mask, ids)
    _gather_mean_kernel[(triton.cdiv(D, block_d), B)](
        ids, weight, m, out, inv, T, D,
        ids.stride(0), ids.stride(1), weight.stride(0), weight.stride(1), s_mb, s_mt,
        HAS_MASK=has, BLOCK_T=16, BLOCK_D=block_d, num_warps=4,
    )
    return out, inv
