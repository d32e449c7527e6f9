"""The public REGAP ops: ``fused_gap_loss``, ``masked_mean`` and ``pooled_text_embeddings``.

Each is a ``torch.library`` custom op (opaque to ``torch.compile``, so no graph break, with a fake
implementation for tracing) whose autograd formula calls a second custom op for the backward.
The backend is chosen (and every input checked) in Python before the op is called.

The backward of both ops is one vector per sample broadcast over its tokens. A side without a mask
gets that vector as a ``[B, 1, D]`` tensor expanded to ``[B, N, D]`` (stride 0: no dense pass); a
masked side gets a dense gradient written in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._primitives import BroadcastSide, GapStats
from ._validation import FLOAT_DTYPES, check_choice, check_mask, check_pair, check_tokens
from .reference import REDUCTIONS, accumulation_dtype

# --------------------------------------------------------------------------------------------------
# fused_gap_loss
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("regap_fast::gap_loss_forward", mutates_args=())
def _gap_loss_forward(image_embeds: Tensor, text_embeds: Tensor, image_mask: Optional[Tensor],
                      text_mask: Optional[Tensor], reduction: str, squared: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, direction [B, D], stats [3, B]); see ``regap_fast.reference.pool_gap_forward``."""
    return backends.get(backend).pool_gap_forward(image_embeds, text_embeds, image_mask, text_mask,
                                                  reduction, squared)


@_gap_loss_forward.register_fake
def _(image_embeds, text_embeds, image_mask, text_mask, reduction, squared, backend):
    B, _, D = image_embeds.shape
    acc = accumulation_dtype(image_embeds.dtype)
    loss = image_embeds.new_empty((B,) if reduction == "none" else (), dtype=acc)
    return loss, image_embeds.new_empty((B, D), dtype=acc), image_embeds.new_empty((3, B), dtype=acc)


@torch.library.custom_op("regap_fast::gap_loss_backward", mutates_args=())
def _gap_loss_backward(grad_loss: Tensor, direction: Tensor, stats: Tensor, image_mask: Optional[Tensor],
                       text_mask: Optional[Tensor], num_image_tokens: int, num_text_tokens: int,
                       dtype: torch.dtype, need_image: bool, need_text: bool,
                       backend: str) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the image and text embeddings: [B, N, D] with a mask, [B, 1, D] without,
    an empty tensor when not needed."""
    stats = GapStats.of(stats)
    image_side = BroadcastSide(stats.inv_image, num_image_tokens, image_mask) if need_image else None
    # d(mu_i - mu_t)/d mu_t = -1
    text_side = BroadcastSide(stats.inv_text, num_text_tokens, text_mask, sign=-1.0) if need_text else None
    gi, gt = backends.get(backend).broadcast_rows(direction, grad_loss.to(direction.dtype), stats.weight,
                                                  image_side, text_side, dtype)
    empty = direction.new_empty((0,), dtype=dtype)
    return (gi if gi is not None else empty), (gt if gt is not None else empty)


def _broadcast_shape(B, n, D, mask, needed):
    if not needed:
        return (0,)
    return (B, n if mask is not None else 1, D)


@_gap_loss_backward.register_fake
def _(grad_loss, direction, stats, image_mask, text_mask, num_image_tokens, num_text_tokens, dtype,
      need_image, need_text, backend):
    B, D = direction.shape
    return (direction.new_empty(_broadcast_shape(B, num_image_tokens, D, image_mask, need_image), dtype=dtype),
            direction.new_empty(_broadcast_shape(B, num_text_tokens, D, text_mask, need_text), dtype=dtype))


def _gap_setup_context(ctx, inputs, output):
    image_embeds, text_embeds, image_mask, text_mask, reduction, squared, backend = inputs
    _, direction, stats = output
    ctx.mark_non_differentiable(direction, stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for direction and stats (two launches)
    ctx.save_for_backward(direction, stats, image_mask, text_mask)
    ctx.num_tokens = (image_embeds.shape[1], text_embeds.shape[1])
    ctx.dtype = image_embeds.dtype
    ctx.backend = backend


def _gap_backward(ctx, grad_loss, _grad_direction, _grad_stats):
    direction, stats, image_mask, text_mask = ctx.saved_tensors
    need_image, need_text = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_image or need_text):
        return None, None, None, None, None, None, None
    n_i, n_t = ctx.num_tokens
    gi, gt = torch.ops.regap_fast.gap_loss_backward(
        grad_loss, direction, stats, image_mask, text_mask, n_i, n_t, ctx.dtype, need_image, need_text,
        ctx.backend)
    B, D = direction.shape
    gi = (gi.expand(B, n_i, D) if image_mask is None else gi) if need_image else None
    gt = (gt.expand(B, n_t, D) if text_mask is None else gt) if need_text else None
    return gi, gt, None, None, None, None, None


_gap_loss_forward.register_autograd(_gap_backward, setup_context=_gap_setup_context)


def fused_gap_loss(image_embeds: Tensor, text_embeds: Tensor, image_mask: Optional[Tensor] = None,
                   text_mask: Optional[Tensor] = None, *, reduction: str = "mean", squared: bool = False,
                   backend: str = "auto") -> Tensor:
    """The REGAP modality-gap loss (arXiv 2505.24208), pooled and reduced in one fused op.

    For each sample ``b``: ``gap[b] = || mean_i image_embeds[b, i] - mean_t text_embeds[b, t] ||_2``
    over the valid tokens of each side (``squared=True``: the squared distance). A sample with no
    valid image or caption token contributes 0, is left out of the mean and gets zero gradient.

    Args:
        image_embeds: ``[B, Ni, D]`` projector outputs (fp16, bf16, fp32; fp64 on the torch backend),
            any strides.
        text_embeds: ``[B, Nt, D]`` the LLM input embeddings of the caption tokens, same dtype.
        image_mask, text_mask: ``[B, N]`` bool, True where the token counts; None: all count.
        reduction: ``"mean"`` over samples that have both sides, ``"sum"``, or ``"none"`` (``[B]``).
        squared: use ``||.||_2^2`` instead of the paper's ``||.||_2``.
        backend: ``"auto"`` (fastest available for the device), ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns:
        The loss in the accumulation dtype (fp32, or fp64 for fp64 inputs): a scalar, or ``[B]``.
    """
    check_tokens("image_embeds", image_embeds)
    check_tokens("text_embeds", text_embeds)
    check_pair("image_embeds", image_embeds, "text_embeds", text_embeds)
    check_mask("image_mask", image_mask, "image_embeds", image_embeds)
    check_mask("text_mask", text_mask, "text_embeds", text_embeds)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    name = backends.resolve(backend, image_embeds.device, image_embeds.dtype)
    loss, _, _ = torch.ops.regap_fast.gap_loss_forward(image_embeds, text_embeds, image_mask, text_mask,
                                                       reduction, squared, name)
    return loss


# --------------------------------------------------------------------------------------------------
# masked_mean
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("regap_fast::masked_mean_forward", mutates_args=())
def _masked_mean_forward(x: Tensor, mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(mean [B, D], 1/n [B]) in the accumulation dtype."""
    return backends.get(backend).masked_mean_forward(x, mask)


@_masked_mean_forward.register_fake
def _(x, mask, backend):
    B, _, D = x.shape
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((B, D), dtype=acc), x.new_empty((B,), dtype=acc)


@torch.library.custom_op("regap_fast::masked_mean_backward", mutates_args=())
def _masked_mean_backward(grad: Tensor, inv_count: Tensor, mask: Optional[Tensor], num_tokens: int,
                          dtype: torch.dtype, backend: str) -> Tensor:
    one = grad.new_ones((), dtype=inv_count.dtype)
    out, _ = backends.get(backend).broadcast_rows(grad.to(inv_count.dtype), one, one,
                                                  BroadcastSide(inv_count, num_tokens, mask), None, dtype)
    return out


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


def _mean_backward(ctx, grad, _grad_inv):
    inv_count, mask = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None
    gx = torch.ops.regap_fast.masked_mean_backward(grad, inv_count, mask, ctx.num_tokens, ctx.dtype,
                                                   ctx.backend)
    if mask is None:
        gx = gx.expand(grad.shape[0], ctx.num_tokens, grad.shape[1])
    return gx, None, None


_masked_mean_forward.register_autograd(_mean_backward, setup_context=_mean_setup_context)


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
    mean, _ = torch.ops.regap_fast.masked_mean_forward(x, mask, name)
    return mean


# --------------------------------------------------------------------------------------------------
# pooled_text_embeddings
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("regap_fast::pooled_text_forward", mutates_args=())
def _pooled_text_forward(input_ids: Tensor, weight: Tensor, mask: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor]:
    """(mean of weight[input_ids] over valid tokens [B, D], 1/n [B]) in the accumulation dtype."""
    return backends.get(backend, "text_pool").gather_mean_forward(input_ids, weight, mask)


@_pooled_text_forward.register_fake
def _(input_ids, weight, mask, backend):
    acc = accumulation_dtype(weight.dtype)
    B = input_ids.shape[0]
    return weight.new_empty((B, weight.shape[1]), dtype=acc), weight.new_empty((B,), dtype=acc)


def _text_setup_context(ctx, inputs, output):
    input_ids, weight, mask, backend = inputs
    _, inv_count = output
    ctx.mark_non_differentiable(inv_count)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input_ids, inv_count, mask)
    ctx.weight_meta = (weight.shape[0], weight.dtype)


def _text_backward(ctx, grad, _grad_inv):
    input_ids, inv_count, mask = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[1]:
        return None, None, None, None
    num_rows, dtype = ctx.weight_meta
    # each valid token's row receives grad[b] / n_b; [B*Nt, D] rows, then the embedding backward
    # (the same dense [V, D] gradient nn.Embedding produces, accumulated in fp32 inside)
    per_token = (grad * inv_count.unsqueeze(1)).unsqueeze(1)
    per_token = per_token.expand(-1, input_ids.shape[1], -1)
    if mask is not None:
        per_token = torch.where(mask.unsqueeze(-1), per_token, 0)
    rows = per_token.reshape(-1, grad.shape[1]).to(dtype)
    gw = torch.ops.aten.embedding_dense_backward(rows, input_ids.reshape(-1), num_rows, -1, False)
    return None, gw, None, None


_pooled_text_forward.register_autograd(_text_backward, setup_context=_text_setup_context)


def pooled_text_embeddings(input_ids: Tensor, weight: Tensor, text_mask: Optional[Tensor] = None, *,
                           backend: str = "auto") -> Tensor:
    """Masked mean of embedding rows ``weight[input_ids]`` per sample: ``[B, Nt] -> [B, D]``.

    The caption side of REGAP straight from token ids (a fused gather + mean: the ``[B, Nt, D]``
    caption embeddings are never materialised), in the accumulation dtype, with the gradient to
    ``weight`` when it requires grad (ShareGPT4V's stage 1 trains the LLM's embedding table).
    ``input_ids`` must lie in ``[0, V)``: like ``nn.Embedding``, the GPU kernels do not check.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int32 or int64 tensor, got "
                        f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, Nt], got {tuple(input_ids.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a [V, D] embedding table")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    if weight.device != input_ids.device:
        raise ValueError(f"input_ids is on {input_ids.device} but weight is on {weight.device}")
    check_mask("text_mask", text_mask, "input_ids", input_ids)
    if input_ids.numel() and input_ids.device.type == "cpu":
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"input_ids must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")
    name = backends.resolve(backend, weight.device, weight.dtype, "text_pool")
    mean, _ = torch.ops.regap_fast.pooled_text_forward(input_ids, weight, text_mask, name)
    return mean
