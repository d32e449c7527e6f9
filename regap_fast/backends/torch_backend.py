"""The ``torch`` backend: every primitive of every family in plain PyTorch (the CPU backend, and the
baseline the kernel backends are measured against). Explicit backward formulas, so that the custom ops
in ``regap_fast.ops`` dispatch to any backend alike. Deterministic: PyTorch's reductions, no atomics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._math import accumulation_dtype, inv_or_zero, mean_from_sum, split_hi_lo
from ..reference import masked_sum_count
from ..contracts import BroadcastSide

# --------------------------------------------------------------------------------------------------
# gap_loss family
# --------------------------------------------------------------------------------------------------


def gap_loss_forward(image_embeds, caption_embeds, image_mask, caption_mask, reduction: str, squared: bool):
    """Returns (loss, direction = dgap/d(mu_i - mu_t) [B, D], stats [3, B] = 1/n_i, 1/n_t, weight)."""
    si, ni = masked_sum_count(image_embeds, image_mask)
    st, nt = masked_sum_count(caption_embeds, caption_mask)
    valid = (ni > 0) & (nt > 0)
    diff = torch.where(valid.unsqueeze(-1), mean_from_sum(si, ni) - mean_from_sum(st, nt), 0)
    sq = (diff * diff).sum(-1)
    if squared:
        gaps, direction = sq, 2 * diff
    else:
        gaps = sq.sqrt()
        direction = diff * inv_or_zero(gaps).unsqueeze(-1)
    weight = valid.to(gaps.dtype)
    if reduction == "mean":
        weight = weight / valid.sum().clamp(min=1).to(gaps.dtype)
    loss = gaps if reduction == "none" else (gaps * weight).sum()
    return loss, direction, torch.stack([inv_or_zero(ni), inv_or_zero(nt), weight])


def masked_mean_forward(x, mask):
    """Returns (mean [B, D], 1/n [B]) in the accumulation dtype."""
    s, n = masked_sum_count(x, mask)
    return mean_from_sum(s, n), inv_or_zero(n)


def broadcast_rows(v, g, w, side_a: BroadcastSide | None, side_t: BroadcastSide | None, dtype: torch.dtype):
    """For each side: ``out[b, n] = side.sign * g[b] * w[b] * side.inv[b] * v[b]`` on valid rows, 0
    elsewhere. g and w are [B] or 0-d. A side without a mask comes back as ``[B, 1, D]``; a side
    given as None as None.
    """
    base = (g * w).to(v.dtype)

    def fill(side: BroadcastSide | None):
        if side is None:
            return None
        vec = (side.sign * base * side.inv).unsqueeze(-1) * v
        if side.mask is None:
            return vec.unsqueeze(1).to(dtype)
        return torch.where(side.mask.unsqueeze(-1), vec.unsqueeze(1), 0).to(dtype)

    return fill(side_a), fill(side_t)


# --------------------------------------------------------------------------------------------------
# text_pool family
# --------------------------------------------------------------------------------------------------


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D], 1/n [B])."""
    return masked_mean_forward(F.embedding(ids, weight), mask)


# --------------------------------------------------------------------------------------------------
# projector family: the memory-bound passes around the projector's GEMMs
# --------------------------------------------------------------------------------------------------


def _by_sample(x, mask_flat, rows_per_sample: int, samples: int):
    """x [M, N] as [samples, rows_per_sample, N] and its mask as [samples, rows_per_sample] (or None):
    rows past M padded with masked-out zeros (only for an M that is not samples * rows_per_sample;
    rows of samples past ``samples`` are left out)."""
    want = samples * rows_per_sample
    mask = mask_flat
    if x.shape[0] != want:
        keep = min(x.shape[0], want)
        pad = want - keep
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask
        mask = torch.cat([mask[:keep], mask.new_zeros(pad)])
        x = torch.cat([x[:keep], x.new_zeros((pad, x.shape[1]))])
    return x.view(samples, rows_per_sample, -1), None if mask is None else mask.view(samples, rows_per_sample)


def gelu_pool_forward(pre, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """h = GELU(pre) (exact erf) and the per-sample sums of the valid rows of h (``[batch, N]`` in the
    accumulation dtype, or None). Here the sum is a second read of h: the one pass REGAP adds on this
    backend (the kernel backends sum inside the GELU pass)."""
    h = F.gelu(pre)
    if not pool:
        return h, None
    rows, mask = _by_sample(h, mask_flat, rows_per_sample, batch)
    return h, masked_sum_count(rows, mask)[0]


def dgelu_backward(dh, pre, mask_flat, rows_per_sample: int, vec, need_dbias: bool):
    """dpre = (dh + vec[sample] on valid rows) * GELU'(pre) and db = the column sums of dpre (accumulation
    dtype, or None). Returns (dpre, db). ``dh`` is a temporary of the caller: the vector is added to it
    in place (an explicit add in dh's dtype: a read and a write of dh), then GELU's own backward runs."""
    if vec is not None:
        add = vec.to(dh.dtype).unsqueeze(1)
        if dh.shape[0] == vec.shape[0] * rows_per_sample and dh.is_contiguous():
            rows, mask = _by_sample(dh, mask_flat, rows_per_sample, vec.shape[0])
            rows.add_(add if mask is None else torch.where(mask.unsqueeze(-1), add, 0))
        else:  # rows that belong to no vector row, or a strided dh: a gathered [M, N] addend
            sample = torch.arange(dh.shape[0], device=dh.device) // rows_per_sample
            ok = sample < vec.shape[0] if mask_flat is None else (sample < vec.shape[0]) & mask_flat
            dh = dh + torch.where(ok[:, None], add[sample.clamp(max=vec.shape[0] - 1), 0], 0)
    dpre = torch.ops.aten.gelu_backward(dh, pre)
    db = dpre.sum(0, dtype=accumulation_dtype(dpre.dtype)) if need_dbias else None
    return dpre, db


def mean_split(v, counts, dtype: torch.dtype):
    """The ``split_hi_lo`` rows (``[2B, N]`` in ``dtype``; ``[B, N]`` for fp32) of ``v / counts`` (THE mean
    formula; ``v`` itself when counts is None): how an fp32 per-sample vector enters a GEMM."""
    return split_hi_lo(v if counts is None else mean_from_sum(v, counts), dtype)
