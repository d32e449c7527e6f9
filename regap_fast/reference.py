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

from ._primitives import BroadcastSide

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


def mean_from_sum(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``s / n`` row by row, 0 where ``n`` is 0: THE formula for a mean, on every backend.

    A correctly rounded division, not ``s * (1 / n)``: two sides with equal means then give
    bitwise-equal results whatever their counts (21 * fl(1/7) is not 3 in fp32), so a zero gap is
    exactly zero and has zero gradient.
    """
    return torch.where(n.unsqueeze(-1) > 0, s / n.clamp(min=1).unsqueeze(-1), 0)


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
    return gap_from_means(mean_from_sum(si, ni), mean_from_sum(st, nt), valid, reduction=reduction, squared=squared)


# --------------------------------------------------------------------------------------------------
# the torch backend: the primitives of regap_fast.ops, with explicit backward formulas
# --------------------------------------------------------------------------------------------------


def inv_or_zero(n: torch.Tensor) -> torch.Tensor:
    """1 / n where n > 0, else 0 (an empty side, or a zero gap, contributes no gradient)."""
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, 1.0 / safe, torch.zeros_like(n))


def pool_gap_forward(image_embeds, text_embeds, image_mask, text_mask, reduction: str, squared: bool):
    """Returns (loss, direction = dgap/d(mu_i - mu_t) [B, D], stats [3, B] = 1/n_i, 1/n_t, weight)."""
    si, ni = masked_sum_count(image_embeds, image_mask)
    st, nt = masked_sum_count(text_embeds, text_mask)
    inv_i, inv_t = inv_or_zero(ni), inv_or_zero(nt)
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
    return loss, direction, torch.stack([inv_i, inv_t, weight])


def masked_mean_forward(x, mask):
    """Returns (mean [B, D], 1/n [B]) in the accumulation dtype."""
    s, n = masked_sum_count(x, mask)
    return mean_from_sum(s, n), inv_or_zero(n)


def gather_mean_forward(ids, weight, mask):
    """Masked mean of embedding rows ``weight[ids]``: (mean [B, D], 1/n [B])."""
    return masked_mean_forward(torch.nn.functional.embedding(ids, weight), mask)


def broadcast_rows(v, g, w, side_a: BroadcastSide | None, side_t: BroadcastSide | None, dtype: torch.dtype):
    """For each side: ``out[b, n] = side.sign * g[b] * w[b] * side.inv[b] * v[b]`` on valid rows, 0
    elsewhere (``regap_fast._primitives.BroadcastSide``). g and w are [B] or 0-d. A side without a
    mask comes back as ``[B, 1, D]``; a side given as None as None.
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
# the torch backend's projector family: LLaVA's MLP with REGAP in plain PyTorch ops
# --------------------------------------------------------------------------------------------------


def gelu_gemm_forward(x2d, w1, b1, mask_flat, rows_per_sample: int, batch: int, pool: bool):
    """pre = x2d @ w1^T + b1, h = GELU(pre) (exact erf), and the per-sample sums of the valid rows of
    h ([batch, N] in the accumulation dtype, or None). Returns (pre, h, pooled_sum).

    The sum is the one read of h that REGAP adds (GPU kernels fold it into the GELU pass); with a
    mask it goes through the masked op (a dense select: masked image rows are the rare case).
    """
    pre = torch.addmm(b1, x2d, w1.t()) if b1 is not None else torch.mm(x2d, w1.t())
    h = torch.nn.functional.gelu(pre)
    if not pool:
        return pre, h, None
    rows = h.view(batch, rows_per_sample, -1)
    if mask_flat is None:
        pooled_sum = rows.sum(1, dtype=accumulation_dtype(h.dtype))
    else:
        pooled_sum, _ = masked_sum_count(rows, mask_flat.view(batch, rows_per_sample))
    return pre, h, pooled_sum


def dgelu_gemm_backward(dy, w2, pre, mask_flat, rows_per_sample: int, vw2, need_dbias: bool):
    """dpre = (dy @ w2 + vw2[sample] on valid rows) * GELU'(pre), and db1 = the column sums of dpre
    (accumulation dtype, or None). Returns (dpre, db1).

    The per-sample vector rides in the dgrad GEMM as its accumulate input, a [B, n, N] view of
    ``vw2`` with stride 0 over the rows (baddbmm; W2 likewise with stride 0 over the batch): no
    [M, N] tensor is created for it. With a mask the input is dense (masked image rows are rare).
    """
    w2 = w2 if w2.dtype == dy.dtype else w2.to(dy.dtype)
    if vw2 is None:
        dh = torch.mm(dy, w2)
    else:
        batch = vw2.shape[0]
        vec = vw2.to(dy.dtype).unsqueeze(1).expand(batch, rows_per_sample, -1)
        if mask_flat is not None:
            vec = torch.where(mask_flat.view(batch, rows_per_sample, 1), vec, 0)
        dh = torch.baddbmm(vec, dy.view(batch, rows_per_sample, -1),
                           w2.unsqueeze(0).expand(batch, -1, -1)).view(dy.shape[0], -1)
    if dh.dtype != pre.dtype:
        dh = dh.to(pre.dtype)
    dpre = torch.ops.aten.gelu_backward(dh, pre)
    db = dpre.sum(0, dtype=accumulation_dtype(dpre.dtype)) if need_dbias else None
    return dpre, db
