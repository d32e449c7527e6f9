"""``fused_gap_loss``, ``gap_from_means`` and ``masked_mean``: the gap and the pooling it is made of.

The recipe of every op here and in the sibling modules: a ``torch.library`` custom op with a fake
implementation (opaque to ``torch.compile``: no graph break), an autograd formula that calls a second
custom op for the backward, and a functional that checks every input and picks the backend *before*
the op is called. The backward is one vector per sample broadcast over its tokens: a side without a
mask gets it as a ``[B, 1, D]`` tensor expanded to ``[B, N, D]`` (stride 0: no dense pass); a masked
side gets a dense gradient written in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _dispatch
from .._math import REDUCTIONS, accumulation_dtype
from .._validation import check_choice, check_means, check_mask, check_pair, check_tokens
from ..contracts import BroadcastSide, GapStats

# --------------------------------------------------------------------------------------------------
# fused_gap_loss
# --------------------------------------------------------------------------------------------------


def _gap_loss_forward_impl(image_embeds: Tensor, caption_embeds: Tensor, image_mask: Optional[Tensor],
                      caption_mask: Optional[Tensor], reduction: str, squared: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, direction [B, D], stats [3, B]); see ``backends.torch_backend.gap_loss_forward``."""
    return backends.get(backend).gap_loss_forward(image_embeds, caption_embeds, image_mask, caption_mask,
                                                  reduction, squared)


_gap_loss_forward = torch.library.custom_op("regap_fast::gap_loss_forward", _gap_loss_forward_impl, mutates_args=())


@_gap_loss_forward.register_fake
def _(image_embeds, caption_embeds, image_mask, caption_mask, reduction, squared, backend):
    B, _, D = image_embeds.shape
    acc = accumulation_dtype(image_embeds.dtype)
    loss = image_embeds.new_empty((B,) if reduction == "none" else (), dtype=acc)
    return loss, image_embeds.new_empty((B, D), dtype=acc), image_embeds.new_empty((3, B), dtype=acc)


def _gap_loss_backward_impl(grad_loss: Tensor, direction: Tensor, stats: Tensor, image_mask: Optional[Tensor],
                       caption_mask: Optional[Tensor], num_image_tokens: int, num_caption_tokens: int,
                       dtype: torch.dtype, need_image: bool, need_caption: bool,
                       backend: str) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the image and caption embeddings: [B, N, D] with a mask, [B, 1, D] without,
    an empty tensor when not needed."""
    stats = GapStats.of(stats)
    image_side = BroadcastSide(stats.inv_image, num_image_tokens, image_mask) if need_image else None
    # d(mu_i - mu_t)/d mu_t = -1
    caption_side = (BroadcastSide(stats.inv_caption, num_caption_tokens, caption_mask, sign=-1.0)
                    if need_caption else None)
    gi, gt = backends.get(backend).broadcast_rows(direction, grad_loss.to(direction.dtype), stats.weight,
                                                  image_side, caption_side, dtype)
    empty = direction.new_empty((0,), dtype=dtype)
    return (gi if gi is not None else empty), (gt if gt is not None else empty)


_gap_loss_backward = torch.library.custom_op("regap_fast::gap_loss_backward", _gap_loss_backward_impl,
                                             mutates_args=())


def _broadcast_shape(B, n, D, mask, needed):
    if not needed:
        return (0,)
    return (B, n if mask is not None else 1, D)


@_gap_loss_backward.register_fake
def _(grad_loss, direction, stats, image_mask, caption_mask, num_image_tokens, num_caption_tokens, dtype,
      need_image, need_caption, backend):
    B, D = direction.shape
    return (direction.new_empty(_broadcast_shape(B, num_image_tokens, D, image_mask, need_image), dtype=dtype),
            direction.new_empty(_broadcast_shape(B, num_caption_tokens, D, caption_mask, need_caption),
                                dtype=dtype))


def _gap_setup_context(ctx, inputs, output):
    image_embeds, caption_embeds, image_mask, caption_mask, reduction, squared, backend = inputs
    _, direction, stats = output
    ctx.mark_non_differentiable(direction, stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for direction and stats (two launches)
    ctx.save_for_backward(direction, stats, image_mask, caption_mask)
    ctx.num_tokens = (image_embeds.shape[1], caption_embeds.shape[1])
    ctx.dtype = image_embeds.dtype
    ctx.backend = backend


def _gap_backward(ctx, grad_loss, _grad_direction, _grad_stats, *, backward):
    direction, stats, image_mask, caption_mask = ctx.saved_tensors
    need_image, need_caption = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_image or need_caption):
        return None, None, None, None, None, None, None
    n_i, n_t = ctx.num_tokens
    gi, gt = backward(grad_loss, direction, stats, image_mask, caption_mask, n_i, n_t, ctx.dtype, need_image,
                      need_caption, ctx.backend)
    B, D = direction.shape
    gi = (gi.expand(B, n_i, D) if image_mask is None else gi) if need_image else None
    gt = (gt.expand(B, n_t, D) if caption_mask is None else gt) if need_caption else None
    return gi, gt, None, None, None, None, None


_dispatch.register_autograd(_gap_loss_forward, _gap_setup_context, _gap_backward, _gap_loss_backward)
_GapLoss = _dispatch.autograd_function("_GapLoss", _gap_loss_forward_impl, _gap_setup_context, _gap_backward,
                                       _gap_loss_backward_impl)


def fused_gap_loss(image_embeds: Tensor, caption_embeds: Tensor, image_mask: Optional[Tensor] = None,
                   caption_mask: Optional[Tensor] = None, *, reduction: str = "mean", squared: bool = False,
                   backend: str = "auto") -> Tensor:
    """The REGAP modality-gap loss (arXiv 2505.24208), pooled and reduced in one fused op.

    For each sample ``b``: ``gap[b] = || mean_i image_embeds[b, i] - mean_t caption_embeds[b, t] ||_2``
    over the valid tokens of each side (``squared=True``: the squared distance). A sample with no
    valid image or caption token contributes 0, is left out of the mean and gets zero gradient.

    Args:
        image_embeds: ``[B, Ni, D]`` projector outputs (fp16, bf16, fp32; fp64 on the torch backend),
            any strides.
        caption_embeds: ``[B, Nt, D]`` the LLM input embeddings of the caption tokens, same dtype. It may
            be ``image_embeds`` itself (one sequence, two masks).
        image_mask, caption_mask: ``[B, N]`` bool, True where the token counts; None: all count.
        reduction: ``"mean"`` over samples that have both sides, ``"sum"``, or ``"none"`` (``[B]``).
        squared: use ``||.||_2^2`` instead of the paper's ``||.||_2``.
        backend: ``"auto"`` (fastest available for the device), ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns:
        The loss in the accumulation dtype (fp32, or fp64 for fp64 inputs): a scalar, or ``[B]``.
    """
    check_tokens("image_embeds", image_embeds)
    check_tokens("caption_embeds", caption_embeds)
    check_pair("image_embeds", image_embeds, "caption_embeds", caption_embeds)
    check_mask("image_mask", image_mask, "image_embeds", image_embeds)
    check_mask("caption_mask", caption_mask, "caption_embeds", caption_embeds)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    name = backends.resolve(backend, image_embeds.device, image_embeds.dtype)
    loss, _, _ = _dispatch.run(_GapLoss, _gap_loss_forward, image_embeds, caption_embeds, image_mask, caption_mask,
                               reduction, squared, name)
    return loss


def gap_from_means(mu_image: Tensor, mu_caption: Tensor, valid: Optional[Tensor] = None, *,
                   reduction: str = "mean", squared: bool = False, backend: str = "auto") -> Tensor:
    """The REGAP loss from pooled embeddings ``[B, D]``: ``reduce_b ||mu_image[b] - mu_caption[b]||``.

    ``valid`` ([B] bool) marks the samples that have both an image and a caption token; the others
    contribute 0 and are not counted in the mean. This is ``fused_gap_loss`` on one token per side
    (``valid`` as the image mask): a fused forward and one backward launch on the kernel backends,
    instead of a chain of small ops (what the fused projectors' pooled outputs meet).
    """
    check_means(mu_image, mu_caption, valid)
    return fused_gap_loss(mu_image.unsqueeze(1), mu_caption.unsqueeze(1), None if valid is None else valid[:, None],
                          None, reduction=reduction, squared=squared, backend=backend)


# --------------------------------------------------------------------------------------------------
# masked_mean
# --------------------------------------------------------------------------------------------------


def _masked_mean_forward_impl(x: Tensor, mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(mean [B, D], 1/n [B]) in the accumulation dtype."""
    return backends.get(backend).masked_mean_forward(x, mask)


_masked_mean_forward = torch.library.custom_op("regap_fast::masked_mean_forward", _masked_mean_forward_impl,
                                               mutates_args=())


@_masked_mean_forward.register_fake
def _(x, mask, backend):
    B, _, D = x.shape
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((B, D), dtype=acc), x.new_empty((B,), dtype=acc)


def _masked_mean_backward_impl(grad: Tensor, inv_count: Tensor, mask: Optional[Tensor], num_tokens: int,
                          dtype: torch.dtype, backend: str) -> Tensor:
    one = grad.new_ones((), dtype=inv_count.dtype)
    out, _ = backends.get(backend).broadcast_rows(grad.to(inv_count.dtype), one, one,
                                                  BroadcastSide(inv_count, num_tokens, mask), None, dtype)
    return out


_masked_mean_backward = torch.library.custom_op("regap_fast::masked_mean_backward", _masked_mean_backward_impl,
                                                mutates_args=())


@_masked_mean_backward.register_fake
def _(grad, inv_count, mask, num_tokens, dtype, backend):
    B, D = grad.shape
    return grad.new_empty(_broadcast_shape(B, num_tokens, D, mask, True), dtype=dtype)


def _mean_setup_context(ctx, inputs, output):
    x, mask, backend = inputs
    _, inv_count = output
    ctx.mark_non_differentiable(inv_count)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inv_count, mask)
    ctx.num_tokens = x.shape[1]
    ctx.dtype = x.dtype
    ctx.backend = backend


def _mean_backward(ctx, grad, _grad_inv, *, backward):
    inv_count, mask = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None
    gx = backward(grad, inv_count, mask, ctx.num_tokens, ctx.dtype, ctx.backend)
    if mask is None:
        gx = gx.expand(grad.shape[0], ctx.num_tokens, grad.shape[1])
    return gx, None, None


_dispatch.register_autograd(_masked_mean_forward, _mean_setup_context, _mean_backward, _masked_mean_backward)
_MaskedMean = _dispatch.autograd_function("_MaskedMean", _masked_mean_forward_impl, _mean_setup_context,
                                          _mean_backward, _masked_mean_backward_impl)


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Mean of the valid rows of each sample: ``[B, N, D] -> [B, D]`` in the accumulation dtype.

    ``mask`` is ``[B, N]`` bool (True = the row counts) or None (all count). A sample with no valid
    row gives a zero vector and zero gradient. Masked-out rows are never read, so padding may hold
    anything, NaN included. Differentiable; the gradient is one vector per sample broadcast over its
    valid rows.
    """
    check_tokens("x", x)
    check_mask("mask", mask, "x", x)
    name = backends.resolve(backend, x.device, x.dtype)
    mean, _ = _dispatch.run(_MaskedMean, _masked_mean_forward, x, mask, name)
    return mean
