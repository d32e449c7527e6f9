"""REGAP for a model, defined once: the caption tokens, the image -> sample mapping, and the gap between
the image tokens and the caption tokens of each sample at the language model's input.

Both the trainer's model (``regap_fast.model.VisionLanguageModel``) and ``apply_regap`` on a transformers
VLM (``regap_fast.integrations.transformers``) build their REGAP term here::

    caption = caption_mask(input_ids, labels, special_ids)            # [B, N] bool
    gap = modality_gap(embeds, embeds, image_mask, caption)           # embeds: what the LLM receives

A fused projector hands the image side over already pooled (one mean per image, from its GEMM epilogue)
and the caption side stays token ids (pooled straight from the embedding table), so no ``[B, N, D]``
tensor is read for REGAP::

    gap = modality_gap(pooled_per_image, input_ids, image_mask, caption, embedding_weight=embed.weight)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ._math import REDUCTIONS
from .constants import IGNORE_INDEX
from .ops import fused_gap_loss, gap_from_means, masked_mean, pooled_text_embeddings



class RegapError(ValueError):
    """A model or batch REGAP cannot handle; the message says why and what to do."""


def check_labels(input_ids: Tensor, labels) -> None:
    """RegapError unless there is one label per input token."""
    if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise RegapError(f"labels {shape} must align with input_ids {tuple(input_ids.shape)} "
                         "(one label per input token, -100 where there is no answer)")


def caption_mask(input_ids: Tensor, labels: Tensor, special_ids: Iterable[int] | Tensor, *,
                 within: Optional[Tensor] = None) -> Tensor:
    """``[B, N]`` bool: the caption tokens, REGAP's text side (the answer's own text tokens).

    A token is a caption token if it is labelled (``labels != -100``), is none of ``special_ids`` (the
    image and video placeholders, BOS, EOS, PAD, chat-template markers) and, where ``within`` is given,
    lies inside it (a labelled stretch that is not caption text, e.g. LLaVA's plain-format separator).
    """
    check_labels(input_ids, labels)
    specials = torch.as_tensor(special_ids if isinstance(special_ids, Tensor) else list(special_ids),
                               dtype=input_ids.dtype, device=input_ids.device)
    mask = (labels.to(input_ids.device) != IGNORE_INDEX) & ~torch.isin(input_ids, specials)
    return mask if within is None else mask & within.to(mask.device)


def gap_samples(image_mask: Optional[Tensor], caption_mask: Tensor) -> Tensor:
    """``[B]`` bool: the samples REGAP counts, those with an image token and a caption token
    (``image_mask`` None: every sample has image tokens)."""
    has_caption = caption_mask.any(1)
    return has_caption if image_mask is None else image_mask.to(has_caption.device).any(1) & has_caption


def image_owners(image_mask: Tensor, num_images: int) -> Tensor:
    """``[num_images]``: the sample each image belongs to.

    ``image_mask`` (``[B, N]`` bool) marks the image tokens' positions; the images come in input order
    and each fills the same number of them, as LLaVA's and BLIP-2's splice place them.
    """
    per_sample = image_mask.sum(1)
    total = per_sample.sum()
    slots = (total // max(num_images, 1)).clamp(min=1)
    # one host sync per step for the check (eager only: a compiled graph would break on it); repeat_interleave is
    # told its size, so it adds none
    if not torch.compiler.is_compiling() and bool((total != slots * num_images) | (per_sample % slots).any()):
        raise RegapError(f"{num_images} images, but the samples hold {per_sample.tolist()} image tokens: cannot tell "
                         "which sample each image belongs to (every image must fill the same number of image tokens)")
    return torch.repeat_interleave(torch.arange(len(per_sample), device=image_mask.device), per_sample // slots,
                                   output_size=num_images)


def modality_gap(image: Tensor, caption: Tensor, image_mask: Optional[Tensor] = None,
                 caption_mask: Optional[Tensor] = None, *, embedding_weight: Optional[Tensor] = None,
                 reduction: str = "mean", squared: bool = False, backend: str = "auto") -> Tensor:
    """The REGAP gap ``reduce_b || mean image token of b - mean caption token of b ||_2`` (``squared``: ``||.||^2``).

    ``image``: ``[B, N, D]`` embeddings (the image tokens where ``image_mask``, ``[B, N]`` bool; None:
    all), or ``[num_images, D]`` means, one per image (a fused projector's pooled output; ``image_mask``
    then marks the images' positions, see ``image_owners``).
    ``caption``: ``[B, N, D]`` embeddings (the caption tokens where ``caption_mask``; None: all), or
    ``[B, N]`` token ids, pooled from ``embedding_weight`` (``[V, D]``) without a ``[B, N, D]`` tensor.
    ``reduction``: ``"mean"`` over the samples with both sides (``gap_samples``), ``"sum"``, or ``"none"``
    (``[B]``, 0 for the others). Differentiable to every float input.
    """
    _check_sides(image, caption, image_mask, caption_mask, embedding_weight)
    if reduction not in REDUCTIONS:
        raise RegapError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if image.dim() == 3 and caption.dim() == 3 and image.dtype == caption.dtype:  # one fused op
        return fused_gap_loss(image, caption, image_mask, caption_mask, reduction=reduction, squared=squared,
                              backend=backend)
    mu_image, has_image = _image_means(image, image_mask, backend)
    mu_caption, has_caption = _caption_means(caption, caption_mask, embedding_weight, backend)
    valid = has_image & has_caption.to(has_image.device)
    return gap_from_means(mu_image, mu_caption.to(mu_image), valid, reduction=reduction, squared=squared)


def _any(mask: Optional[Tensor], x: Tensor) -> Tensor:
    if mask is None:
        return torch.full((x.shape[0],), x.shape[1] > 0, dtype=torch.bool, device=x.device)
    return mask.any(1)


def _image_means(image: Tensor, image_mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """``[B, D]`` per-sample image means (accumulation dtype) and which samples have an image token."""
    if image.dim() == 3:
        return masked_mean(image, image_mask, backend=backend), _any(image_mask, image)
    owners = image_owners(image_mask.to(image.device), image.shape[0])
    batch = image_mask.shape[0]
    sums = image.new_zeros(batch, image.shape[1]).index_add(0, owners, image)
    images = torch.zeros(batch, dtype=torch.long, device=owners.device).index_add(0, owners, torch.ones_like(owners))
    return sums / images.clamp(min=1).unsqueeze(1).to(sums), images > 0


def _caption_means(caption: Tensor, caption_mask: Optional[Tensor], weight: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor]:
    """``[B, D]`` per-sample caption means (accumulation dtype) and which samples have a caption token."""
    if caption.dim() == 3:
        return masked_mean(caption, caption_mask, backend=backend), _any(caption_mask, caption)
    mask = None if caption_mask is None else caption_mask.to(weight.device)
    return pooled_text_embeddings(caption.to(weight.device), weight, mask, backend=backend), _any(caption_mask, caption)


def _check_sides(image, caption, image_mask, caption_mask, weight) -> None:
    """One RegapError naming the argument for any input modality_gap cannot take."""
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() not in (2, 3):
        raise RegapError("image must be a float tensor: [B, N, D] embeddings or [num_images, D] per-image means")
    if not isinstance(caption, Tensor) or caption.dim() != (3 if caption.is_floating_point() else 2):
        raise RegapError("caption must be [B, N, D] float embeddings or [B, N] integer token ids")
    if image.dim() == 2 and image_mask is None:
        raise RegapError("per-image means need image_mask (the image tokens' positions) to find each image's sample")
    if caption.dim() == 2 and (not isinstance(weight, Tensor) or weight.dim() != 2):
        raise RegapError("caption token ids need embedding_weight, the [V, D] input embedding table")
    batch = image.shape[0] if image.dim() == 3 else image_mask.shape[0]
    for name, mask, side in (("image_mask", image_mask, image if image.dim() == 3 else None),
                             ("caption_mask", caption_mask, caption)):
        shape = (batch, None) if side is None else tuple(side.shape[:2])
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2
                                 or mask.shape[0] != shape[0] or shape[1] not in (None, mask.shape[1])):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise RegapError(f"{name} must be a bool tensor shaped [B, N] = {shape}, got {got}")
    if caption.shape[0] != batch:
        raise RegapError(f"image side has {batch} samples, caption side {caption.shape[0]}")
    dims = image.shape[-1], caption.shape[-1] if caption.dim() == 3 else weight.shape[1]
    if dims[0] != dims[1]:
        raise RegapError(f"embedding sizes differ: image side D={dims[0]}, caption side D={dims[1]}")
