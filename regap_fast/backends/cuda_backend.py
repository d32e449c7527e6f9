"""The ``cuda`` backend: the hand-written CUDA C++ kernels of ``regap_fast._C`` (csrc/*.cu).

Every primitive has the name, signature and contract of the torch backend's (``torch_backend.py``);
``regap_fast.backends`` imports this module only after ``import regap_fast._C`` has succeeded.
Inputs are validated by the public ops before they get here; the bindings keep only the checks that
protect memory.
"""

from __future__ import annotations

import torch

from .. import _C

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def gap_loss_forward(image_embeds, caption_embeds, image_mask, caption_mask, reduction: str, squared: bool):
    """Forward of the gap loss. Returns (loss, direction [B, D] fp32, stats [3, B] fp32)."""
    return _C.gap_loss_forward(image_embeds, caption_embeds, image_mask, caption_mask, _REDUCTION_CODES[reduction],
                               bool(squared))


def masked_mean_forward(x, mask):
    """Masked mean over tokens. Returns (mean [B, D] fp32, inv_count [B] fp32)."""
    return _C.masked_mean_forward(x, mask)


def broadcast_rows(v, g, w, side_a, side_t, dtype: torch.dtype):
    """For each ``BroadcastSide``: out[b, n] = sign g[b] w[b] inv[b] v[b] on valid rows (0 on masked
    rows). A side with no mask is returned as [B, 1, D] (the caller expands it); a side given as None
    as None."""
    return _C.broadcast_rows(v, g, w, side_a, side_t, dtype)


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D] fp32, inv_count [B] fp32)."""
    return _C.gather_mean_forward(ids, weight, mask)


def gelu_pool_forward(pre, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """One pass over pre: h = GELU(pre) and the per-sample sums of the valid rows of the stored h.
    Returns (h in pre's dtype, pooled_sum [batch, N] fp32 or None)."""
    return _C.gelu_pool_forward(pre, mask_flat, int(rows_per_sample), int(batch), bool(pool))


def dgelu_backward(dh, pre, mask_flat, rows_per_sample: int, vec, need_dbias: bool):
    """One pass: dpre = (dh + vec[sample] on valid rows) * GELU'(pre), written over dh, and db = the
    column sums of the stored dpre (fp32, or None)."""
    return _C.dgelu_backward(dh, pre, mask_flat, int(rows_per_sample), vec, bool(need_dbias), True)


def mean_split(v, counts, dtype: torch.dtype):
    """The hi/lo rows of ``v / counts`` in ``dtype`` (``[2B, N]``; ``[B, N]`` for fp32), one launch."""
    return _C.mean_split(v, counts, dtype)
