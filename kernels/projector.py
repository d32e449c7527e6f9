"""Triton GEMMs with REGAP epilogues for LLaVA's projector (docs/design.md, "The fused projector").

forward   ``gelu_gemm_forward``:  pre = x @ W1^T + b1;  h = GELU(pre)  (exact erf);
          stores pre and h (what the unfused projector keeps for its backward anyway) and, in the
          same epilogue, adds each tile's valid rows of h into ``pooled_sum[sample]`` — the pooled
          hidden state that gives the pooled image embedding as ``pooled_h @ W2^T + b2``.
backward  ``dgelu_gemm_backward``: dh = dE @ W2, plus the gap's per-sample vector ``vW2[sample]`` on
          valid rows (the broadcast REGAP gradient, never materialised), times GELU'(pre); stores
          dpre and adds its column sums into db1.

Rows are the flattened ``B * Ni`` image tokens; row r belongs to sample ``r // Ni``. A tile spans
few samples, so the per-sample work loops over the samples in the tile (one for Ni >= BLOCK_M).
The pooled sums and db1 use fp32 atomics: their summation order (not their value) varies run to run.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# globals used inside @triton.jit functions must be constexpr objects
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
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each column tile while it sits in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = A[rows, :] @ B[:, cols] in fp32."""
    # rows/cols wrap around instead of being masked: out-of-range ones are dropped at the store
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gelu_gemm_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pre_ptr, h_ptr, pooled_ptr, mask_ptr,
    M, N, K, M_BUCKET, rows_per_sample,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_pooled,
    HAS_BIAS: tl.constexpr, POOL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mainloop(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_dtype = h_ptr.dtype.element_ty
    pre = acc.to(out_dtype)
    h = _gelu(acc).to(out_dtype)
    offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(pre_ptr + offs, pre, mask=ok)
    tl.store(h_ptr + offs, h, mask=ok)
    if POOL:
        # pool the stored (rounded) h: exactly what the second layer will see
        valid = row_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        hv = tl.where(valid[:, None], h.to(tl.float32), 0.0)
        sample = rows // rows_per_sample
        first = (pid_m * BLOCK_M) // rows_per_sample
        last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
        for s in range(first, last + 1):
            part = tl.sum(tl.where((sample == s)[:, None], hv, 0.0), axis=0)
            tl.atomic_add(pooled_ptr + s * stride_pooled + cols, part, mask=col_ok)


@triton.jit
def _dgelu_gemm_bwd_kernel(
    dy_ptr, w_ptr, pre_ptr, dpre_ptr, vw_ptr, mask_ptr, db_ptr,
    M, N, K, M_BUCKET, rows_per_sample,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_prem, stride_dm, stride_vw,
    HAS_VEC: tl.constexpr, HAS_MASK: tl.constexpr, DBIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mainloop(dy_ptr, w_ptr, M, N, K, stride_dym, stride_dyk, stride_wk, stride_wn, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if HAS_VEC:
        # the REGAP gradient of sample s reaches h as vW2[s] on each valid row
        valid = row_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        sample = rows // rows_per_sample
        first = (pid_m * BLOCK_M) // rows_per_sample
        last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
        for s in range(first, last + 1):
            v = tl.load(vw_ptr + s * stride_vw + cols, mask=col_ok, other=0.0)
            acc += tl.where((valid & (sample == s))[:, None], v[None, :], 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    pre = tl.load(pre_ptr + rows.to(tl.int64)[:, None] * stride_prem + cols[None, :], mask=ok, other=0.0)
    dpre = (acc * _gelu_grad(pre.to(tl.float32))).to(dpre_ptr.dtype.element_ty)
    tl.store(dpre_ptr + rows.to(tl.int64)[:, None] * stride_dm + cols[None, :], dpre, mask=ok)
    if DBIAS:
        part = tl.sum(tl.where(ok, dpre.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(db_ptr + cols, part, mask=col_ok)


INTERPRETED = isinstance(_gelu_gemm_fwd_kernel, InterpretedFunction)

# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _configs():
    if INTERPRETED:  # the interpreter runs one program at a time: small tiles, one config
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)]
    if os.environ.get("REGAP_FAST_AUTOTUNE", "1") == "0":
        # no tuning (GPU tests: seconds per shape otherwise); small enough for fp32 on any sm_80+
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)]
    return [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]


def _autotune_configs():
    out = []
    for c in _configs():
        c = dict(c)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        out.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return out


def m_bucket(M: int) -> int:
    """The autotuning key for the row count: the next power of two. A new batch size, or the last
    partial batch of an epoch, reuses the tuned config of its bucket instead of tuning again
    (seconds each time: 10.4 s in the demo's first step on an H100 when M itself was the key)."""
    return triton.next_power_of_2(max(1, M))


# The key holds M_BUCKET, not M. reset_to_zero: autotuning reruns the kernel on the real buffers;
# the atomically accumulated ones must start from zero again for each trial (and after the last).
# REGAP_FAST_AUTOTUNE=0 (read at import) leaves one fixed config: no tuning at all.
_fwd = triton.autotune(_autotune_configs(), key=["M_BUCKET", "N", "K", "POOL"],
                       reset_to_zero=["pooled_ptr"])(_gelu_gemm_fwd_kernel)
_bwd = triton.autotune(_autotune_configs(), key=["M_BUCKET", "N", "K", "HAS_VEC"],
                       reset_to_zero=["db_ptr"])(_dgelu_gemm_bwd_kernel)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def gelu_gemm_forward(x2d, w1, b1, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """x2d [M, K] @ w1[N, K]^T + b1 -> (pre, h) [M, N] in x's dtype, pooled_sum [B, N] fp32 (or None)."""
    M, K = x2d.shape
    N = w1.shape[0]
    pre = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    h = torch.empty_like(pre)
    pooled = torch.zeros((batch, N), device=x2d.device, dtype=torch.float32) if pool else None
    mask = mask_flat.view(torch.uint8) if mask_flat is not None else x2d
    _fwd[_grid(M, N)](
        x2d, w1, b1 if b1 is not None else x2d, pre, h, pooled if pool else pre, mask,
        M, N, K, m_bucket(M), rows_per_sample,
        x2d.stride(0), x2d.stride(1), w1.stride(1), w1.stride(0), pre.stride(0), N,
        HAS_BIAS=b1 is not None, POOL=pool, HAS_MASK=mask_flat is not None, PRECISION=_precision(x2d.dtype),
    )
    return pre, h, pooled


def dgelu_gemm_backward(dy, w2, pre, mask_flat, rows_per_sample: int, vw2, need_dbias: bool):
    """dpre = (dy @ w2 + vw2[sample] on valid rows) * GELU'(pre); db1 = column sums of dpre (fp32)."""
    M, K = dy.shape
    N = w2.shape[1]
    dpre = torch.empty((M, N), device=dy.device, dtype=pre.dtype)
    db = torch.zeros((N,), device=dy.device, dtype=torch.float32) if need_dbias else None
    mask = mask_flat.view(torch.uint8) if mask_flat is not None else dy
    _bwd[_grid(M, N)](
        dy, w2, pre, dpre, vw2 if vw2 is not None else dy, mask, db if need_dbias else dpre,
        M, N, K, m_bucket(M), rows_per_sample,
        dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), pre.stride(0), dpre.stride(0),
        vw2.stride(0) if vw2 is not None else 0,
        HAS_VEC=vw2 is not None, HAS_MASK=mask_flat is not None, DBIAS=need_dbias,
        PRECISION=_precision(dy.dtype),
    )
    return dpre, db
