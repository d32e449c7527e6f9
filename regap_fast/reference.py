"""The definition of REGAP in plain, differentiable PyTorch: what every op and backend is tested against.

Readable rather than fast (it materialises fp32 copies); fp64 inputs stay fp64, so ``gradcheck`` works.
The torch *backend* (``regap_fast.backends.torch_backend``) is a separate thing: the same primitives
as the kernel backends, with explicit backward formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._math import accumulation_dtype, mean_from_sum


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
    return mean_from_sum(*masked_sum_count(x, mask))


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


def gap_from_means_reference(mu_image: torch.Tensor, mu_caption: torch.Tensor, valid: torch.Tensor | None = None,
                             *, reduction: str = "mean", squared: bool = False) -> torch.Tensor:
    """The REGAP loss from pooled embeddings ``[B, D]``: ``reduce_b ||mu_image[b] - mu_caption[b]||``.

    ``valid`` ([B] bool) marks the samples that have both an image and a caption token; the others
    contribute 0 and are not counted in the mean.
    """
    diff = mu_image - mu_caption
    if valid is not None:
        diff = torch.where(valid.unsqueeze(-1), diff, 0)
    else:
        valid = torch.ones(diff.shape[0], dtype=torch.bool, device=diff.device)
    return reduce_gaps(_l2(diff, squared), valid, reduction)


def gap_loss_reference(image_embeds, caption_embeds, image_mask=None, caption_mask=None, *,
                       reduction: str = "mean", squared: bool = False) -> torch.Tensor:
    """``fused_gap_loss`` in plain differentiable PyTorch."""
    si, ni = masked_sum_count(image_embeds, image_mask)
    st, nt = masked_sum_count(caption_embeds, caption_mask)
    valid = (ni > 0) & (nt > 0)
    return gap_from_means_reference(mean_from_sum(si, ni), mean_from_sum(st, nt), valid, reduction=reduction,
                                    squared=squared)


def llava_projector_reference(x: torch.Tensor, w1, b1, w2, b2, image_mask=None):
    """LLaVA-1.5's projector and the masked mean of its outputs: ``(out [B, N, D], pooled [B, D])``,
    pooled *after the fact* from the outputs, in the accumulation dtype."""
    out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return out, masked_mean_reference(out, image_mask)


def linear_projector_reference(x: torch.Tensor, w, b, image_mask=None):
    """One linear layer and the masked mean of its outputs, pooled after the fact."""
    out = F.linear(x, w, b)
    return out, masked_mean_reference(out, image_mask)
