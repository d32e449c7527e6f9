"""The arithmetic every backend shares: accumulation dtype, THE mean formula, the hi/lo split, the
fp32-output GEMM. One definition each; the Triton and CUDA kernels implement the same formulas
(kernels/*.py, csrc/common.cuh) and the tests hold them to these.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")

# cuBLAS's bf16/fp16 GEMM with an fp32 output (aten::mm.dtype, PyTorch >= 2.8; CUDA only)
_HAS_MM_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (so gradcheck works); every other float accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_from_sum(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``s / n`` row by row, 0 where ``n`` is 0: THE formula for a mean, on every backend.

    A correctly rounded division, not ``s * (1 / n)``: two sides with equal means then give
    bitwise-equal results whatever their counts (21 * fl(1/7) is not 3 in fp32), so a zero gap is
    exactly zero and has zero gradient.
    """
    return torch.where(n.unsqueeze(-1) > 0, s / n.clamp(min=1).unsqueeze(-1), 0)


def inv_or_zero(n: torch.Tensor) -> torch.Tensor:
    """1 / n where n > 0, else 0 (an empty side, or a zero gap, contributes no gradient)."""
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, 1.0 / safe, torch.zeros_like(n))


def is_split_dtype(dtype: torch.dtype) -> bool:
    """16-bit compute dtypes carry an fp32 [B, D] vector into a GEMM as two rows (hi, lo)."""
    return dtype in (torch.float16, torch.bfloat16)


def split_hi_lo(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 ``[B, D]`` as ``[2B, D]`` rows of ``dtype``: ``hi = dtype(v)`` then ``lo = dtype(v - hi)``,
    so that ``hi @ W + lo @ W`` (fp32 accumulation) is ``v @ W`` to ~16 bits without an fp32 copy
    of ``W``. For fp32/fp64 ``dtype`` it is ``v`` itself, ``[B, D]``."""
    if not is_split_dtype(dtype):
        return v.to(dtype)
    hi = v.to(dtype)
    return torch.cat([hi, (v - hi.to(v.dtype)).to(dtype)])


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 result (fp64 for fp64 operands): cuBLAS's
    16-bit GEMM with an fp32 output on a GPU; elsewhere the same products (exact for 16-bit values)
    in an fp32 GEMM."""
    if a.dtype == torch.float64:
        return torch.mm(a, b)
    if a.is_cuda and _HAS_MM_DTYPE and is_split_dtype(a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def join_hi_lo(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """The ``[2B, N]`` product of ``split_hi_lo`` rows back to ``[B, N]`` (hi part + lo part)."""
    return rows if rows.shape[0] == batch else rows[:batch] + rows[batch:]
