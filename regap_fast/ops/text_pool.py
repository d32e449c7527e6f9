"""``pooled_text_embeddings``: the caption side of REGAP straight from token ids (an embedding-bag mean)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _dispatch
from .._math import accumulation_dtype
from .._validation import FLOAT_DTYPES, check_mask


def _gather_mean_forward_impl(input_ids: Tensor, weight: Tensor, mask: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor]:
    """(mean of weight[input_ids] over valid tokens [B, D], 1/n [B]) in the accumulation dtype."""
    return backends.get(backend, "text_pool").gather_mean_forward(input_ids, weight, mask)


_gather_mean_forward = torch.library.custom_op("regap_fast::gather_mean_forward", _gather_mean_forward_impl,
                                               mutates_args=())


@_gather_mean_forward.register_fake
def _(input_ids, weight, mask, backend):
    acc = accumulation_dtype(weight.dtype)
    B = input_ids.shape[0]
    return weight.new_empty((B, weight.shape[1]), dtype=acc), weight.new_empty((B,), dtype=acc)


def _setup_context(ctx, inputs, output):
    input_ids, weight, mask, backend = inputs
    _, inv_count = output
    ctx.mark_non_differentiable(inv_count)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input_ids, inv_count, mask)
    ctx.weight_meta = (weight.shape[0], weight.dtype)


def _backward(ctx, grad, _grad_inv, *, backward=None):  # plain ATen ops: no backward op of its own
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


_dispatch.register_autograd(_gather_mean_forward, _setup_context, _backward, None)
_GatherMean = _dispatch.autograd_function("_GatherMean", _gather_mean_forward_impl, _setup_context, _backward, None)


def pooled_text_embeddings(input_ids: Tensor, weight: Tensor, caption_mask: Optional[Tensor] = None, *,
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
    check_mask("caption_mask", caption_mask, "input_ids", input_ids)
    # (eager CPU only: the check reads values, which a compiled graph cannot branch on)
    if input_ids.numel() and input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"input_ids must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")
    name = backends.resolve(backend, weight.device, weight.dtype, "text_pool")
    mean, _ = _dispatch.run(_GatherMean, _gather_mean_forward, input_ids, weight, caption_mask, name)
    return mean
