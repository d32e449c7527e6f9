"""Plain-PyTorch REGAP: the reference every kernel is tested against, and the CPU backend.

Two layers live here:

* the *definition* (``masked_mean_reference``, ``gap_from_means``, ``gap_loss_reference``):
  differentiable PyTorch, readable, used by the tests, by the fused projector path (which only
  ever holds the pooled ``[B, D]`` means) and by the gap-measurement tool;
* the ``torch`` *backend* (``pool_gap_forward``, ``masked_mean_forward``, ``broadcast_rows``):
  the same three primitives the Triton and CUDA backends provide, with explicit backward
  formulas, so that the custom ops in ``regap_fast.ops`` dispatch to any backend alike.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (so gradcheck works); every other float accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# the definition
# --------------------------------------------------------------------------------------------------


def masked_sum_count(x: torch.Tensor, mask: torch.Tensor | None):
    """Sum of the valid rows of each sample and their number, in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    xs = x.to(acc)
    if mask is None:
        return xs.sum(1), torch.full((x.shape[0],), x.shape[1], dtype=acc, device=x.device)
    # where, not multiply: padding may hold NaN or inf, and 0 * NaN is NaN
    return torch.where(mask.unsqueeze(-1), xs, 0).sum(1), mask.sum(1).to(acc)


def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the valid rows of each sample ``[B, D]``; 0 for a sample with no valid row."""
    s, n = masked_sum_count(x, mask)
    return s / n.clamp(min=1).unsqueeze(-1)


def _l2(diff: torch.Tensor, squared: bool) -> torch.Tensor:
    """Row norms with a zero (not NaN) gradient at a zero vector."""
    sq = (diff * diff).sum(-1)
    if squared:
        return sq
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq))


def reduce_gaps(gaps: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """gaps [B] (0 where not valid) -> the loss: mean over valid samples, sum, or as is."""
    if reduction == "none":
        return gaps
    total = gaps.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(gaps.dtype)


def gap_from_means(mu_image: torch.Tensor, mu_text: torch.Tensor, valid: torch.Tensor | None = None,
                   *, reduction: str = "mean", squared: bool = False) -> torch.Tensor:
    """The REGAP loss from pooled embeddings ``[B, D]``: ``reduce_b ||mu_image[b] - mu_text[b]||``.

    ``valid`` ([B] bool) marks the samples that have both an image and a caption token; the others
    contribute 0 and are not counted in the mean.
    """
    diff = mu_image - mu_text
    if valid is not None:
        diff = torch.where(valid.unsqueeze(-1), diff, 0)
    else:
        valid = torch.ones(diff.shape[0], dtype=torch.bool, device=diff.device)
    return reduce_gaps(_l2(diff, squared), valid, reduction)


def gap_loss_reference(image_embeds, text_embeds, image_mask=None, text_mask=None, *,
                       reduction: str = "mean", squared: bool = False) -> torch.Tensor:
    """``fused_gap_loss`` in plain differentiable PyTorch (materialises fp32 copies; for tests)."""
    si, ni = masked_sum_count(image_embeds, image_mask)
    st, nt = masked_sum_count(text_embeds, text_mask)
    valid = (ni > 0) & (nt > 0)
    mu_i = si / ni.clamp(min=1).unsqueeze(-1)
    mu_t = st / nt.clamp(min=1).unsqueeze(-1)
    return gap_from_means(mu_i, mu_t, valid, reduction=reduction, squared=squared)


# --------------------------------------------------------------------------------------------------
# the torch backend: the primitives of regap_fast.ops, with explicit backward formulas
# --------------------------------------------------------------------------------------------------


def _inv(n: torch.Tensor) -> torch.Tensor:
    """1 / n where n > 0, else 0 (an empty side, or a zero gap, contributes no gradient)."""
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, 1.0 / safe, torch.zeros_like(n))


def pool_gap_forward(image_embeds, text_embeds, image_mask, text_mask, reduction: str, squared: bool):
    """Returns (loss, direction = dgap/d(mu_i - mu_t) [B, D], stats [3, B] = 1/n_i, 1/n_t, weight)."""
    si, ni = masked_sum_count(image_embeds, image_mask)
    st, nt = masked_sum_count(text_embeds, text_mask)
    inv_i, inv_t = _inv(ni), _inv(nt)
    valid = (ni > 0) & (nt > 0)
    diff = torch.where(valid.unsqueeze(-1), si * inv_i.unsqueeze(-1) - st * inv_t.unsqueeze(-1), 0)
    sq = (diff * diff).sum(-1)
    if squared:
        gaps, direction = sq, 2 * diff
    else:
        gaps = sq.sqrt()
        direction = diff * _inv(gaps).unsqueeze(-1)
    weight = valid.to(gaps.dtype)
    if reduction == "mean":
        weight = weight / valid.sum().clamp(min=1).to(gaps.dtype)
    loss = gaps if reduction == "none" else (gaps * weight).sum()
    return loss, direction, torch.stack([inv_i, inv_t, weight])


def masked_mean_forward(x, mask):
    """Returns (mean [B, D], 1/n [B]) in the accumulation dtype."""
    s, n = masked_sum_count(x, mask)
    inv = _inv(n)
    return s * inv.unsqueeze(-1), inv


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D], 1/n [B])."""
    return masked_mean_forward(torch.nn.functional.embedding(ids, weight), mask)


def broadcast_rows(v, g, w, inv_a, inv_t, n_a: int, n_t: int, mask_a, mask_t,
                   dtype: torch.dtype, need_a: bool, need_t: bool, sign_t: float):
    """out_a[b, n] = g[b] w[b] inv_a[b] v[b] on valid rows (0 elsewhere); out_t likewise * sign_t.

    A side with no mask comes back as ``[B, 1, D]``; a side not needed as None.
    """
    base = (g * w).to(v.dtype)

    def side(inv, mask, sign):
        vec = (sign * base * inv).unsqueeze(-1) * v
        if mask is None:
            return vec.unsqueeze(1).to(dtype)
        return torch.where(mask.unsqueeze(-1), vec.unsqueeze(1), 0).to(dtype)

    return (side(inv_a, mask_a, 1.0) if need_a else None,
            side(inv_t, mask_t, sign_t) if need_t else None)
