"""The ``cuda`` backend: the hand-written CUDA C++ kernels of ``regap_fast._C`` (csrc/*.cu).

Every kernel family of ``regap_fast.backends`` (gap_loss, text_pool, projector), with the same
signatures and contracts as the Triton (``regap_fast.kernels``) and torch (``regap_fast.reference``)
primitives; the projector's GEMMs are cuBLAS (through torch), its epilogues our kernels.
``regap_fast.backends`` imports this module only after ``import regap_fast._C`` has succeeded.
Inputs are validated by the public ops before they get here.
"""

from __future__ import annotations

import torch

from . import _C

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def pool_gap_forward(image_embeds, text_embeds, image_mask, text_mask, reduction: str, squared: bool):
    """Forward of the gap loss. Returns (loss, direction [B, D] fp32, stats [3, B] fp32)."""
    return _C.pool_gap_forward(image_embeds, text_embeds, image_mask, text_mask, _REDUCTION_CODES[reduction],
                               bool(squared))


def masked_mean_forward(x, mask):
    """Masked mean over tokens. Returns (mean [B, D] fp32, inv_count [B] fp32)."""
    return _C.masked_mean_forward(x, mask)


def broadcast_rows(v, g, w, side_a, side_t, dtype: torch.dtype):
    """For each ``BroadcastSide``: out[b, n] = sign g[b] w[b] inv[b] v[b] on valid rows (0 on masked
    rows). g and w are [B] or 0-d fp32 tensors. A side with no mask is returned as [B, 1, D] (the
    caller expands it); a side given as None as None."""
    return _C.broadcast_rows(v, g, w, side_a, side_t, dtype)


# --------------------------------------------------------------------------------------------------
# text_pool family (csrc/text_pool.cu)
# --------------------------------------------------------------------------------------------------


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D] fp32, inv_count [B] fp32)."""
    return _C.gather_mean_forward(ids, weight, mask)


# --------------------------------------------------------------------------------------------------
# projector family: cuBLAS GEMMs (torch) + one fused CUDA epilogue pass each (csrc/projector.cu)
# --------------------------------------------------------------------------------------------------


def gelu_gemm_forward(x2d, w1, b1, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """pre = x2d @ w1^T + b1 (cuBLAS), then one kernel: h = GELU(pre) and the per-sample sums of the
    valid rows of h. Returns (pre, h) [M, N] in x2d's dtype and pooled_sum [batch, N] fp32 (or None)."""
    dtype = x2d.dtype
    w1 = w1 if w1.dtype == dtype else w1.to(dtype)
    if b1 is None:
        pre = torch.mm(x2d, w1.t())
    else:
        pre = torch.addmm(b1 if b1.dtype == dtype else b1.to(dtype), x2d, w1.t())
    h, pooled = _C.gelu_pool_forward(pre, mask_flat, int(rows_per_sample), int(batch), bool(pool))
    return pre, h, pooled


def dgelu_gemm_backward(dy, w2, pre, mask_flat, rows_per_sample: int, vw2, need_dbias: bool):
    """dh = dy @ w2 (cuBLAS, in dy's dtype), then one kernel: dpre = (dh + vw2[sample] on valid rows)
    * GELU'(pre) in pre's dtype and db = the column sums of dpre (fp32, or None).

    dpre is written over dh (a temporary of this function): no second [M, N] buffer."""
    dh = torch.mm(dy, w2 if w2.dtype == dy.dtype else w2.to(dy.dtype))
    if dh.dtype != pre.dtype:
        dh = dh.to(pre.dtype)
    return _C.dgelu_backward(dh, pre, mask_flat, int(rows_per_sample), vw2, bool(need_dbias), True)
