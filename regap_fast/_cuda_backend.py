"""The ``cuda`` backend: the hand-written CUDA C++ kernels of ``regap_fast._C`` (csrc/gap_loss.cu).

The same three primitives, with the same signatures and contracts, as ``regap_fast.kernels.gap_loss``
(Triton) and ``regap_fast.reference`` (torch); ``regap_fast.backends`` imports this module only after
``import regap_fast._C`` has succeeded. Inputs are validated by the public ops before they get here.
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


def broadcast_rows(v, g, w, inv_a, inv_t, n_a: int, n_t: int, mask_a, mask_t,
                   dtype: torch.dtype, need_a: bool, need_t: bool, sign_t: float):
    """out_a[b, n] = g[b] w[b] inv_a[b] v[b] on valid rows, out_t likewise times sign_t.

    g and w are [B] or 0-d (broadcast) fp32 tensors. A side with no mask is returned as [B, 1, D]
    (the caller expands it); a side not needed is None.
    """
    return _C.broadcast_rows(v, g, w, inv_a, inv_t, int(n_a), int(n_t), mask_a, mask_t, dtype, bool(need_a),
                             bool(need_t), float(sign_t))
