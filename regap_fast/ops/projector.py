"""Projectors that hand REGAP their pooled output without an extra pass over the activations.

``llava_projector``  LLaVA-1.5's ``mlp2x_gelu``: Linear(Dv, D) -> GELU (exact erf) -> Linear(D, D).
``linear_projector`` one Linear (MiniGPT-4's ``llama_proj``, BLIP-2's ``language_projection``).

Each returns ``(out, pooled)``: the projector's output and the masked mean of it, ``[B, D]`` fp32,
computed from the pooled *input of the last linear layer* (the last layer is linear):

    mean_i (h_i W^T + b) = (mean_i h_i) W^T + b

The pass structure (docs/design.md, "The fused projector"), with the plain projector's five GEMMs as
they are (cuBLAS, the compute dtype, no fp32 weight copies) and REGAP folded into the passes that
run anyway:

forward   pre = x W1^T + b1 (GEMM) -> ``gelu_pool_forward``: h = GELU(pre) and the per-sample sums of h
          in the same pass -> out = h W2^T + b2 (GEMM); pooled = mean(h) W2^T + b2 as ``mean_split``'s
          hi/lo rows times W2 (a [2B, D] GEMM with an fp32 result)
backward dh = dout W2 (GEMM) -> ``dgelu_backward``: dpre = (dh + v[sample]) GELU'(pre) in place, with
          db1 in the same pass, where v = (dpooled / n) W2; dW2 = dpooled^T mean(h), then
          dW2 += dout^T h in place (GEMM); dW1 = dpre^T x (GEMM); dx = dpre W1 (GEMM, if needed)

Nothing ``[B, N, D]``-sized is created for REGAP on the kernel backends; the torch backend (plain
PyTorch) reads h once more to pool it and adds v to dh explicitly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._math import accumulation_dtype, join_hi_lo, mm_fp32
from .._validation import check_projector_input


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x W^T + b on 2-D x: what nn.Linear runs (cuBLAS, with the bias in its epilogue on a GPU)."""
    return torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())


def _pooled_output(parts: Tensor, w: Tensor, b: Optional[Tensor], batch: int) -> Tensor:
    """pooled = mean @ W^T + b in fp32, the mean given as ``mean_split`` rows of the compute dtype."""
    pooled = join_hi_lo(mm_fp32(parts, w.t()), batch)
    return pooled if b is None else pooled.add_(b)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _no_autocast(device: torch.device):
    """The ops run in the dtypes they are given: autocast (thread-local, still on inside a custom op
    called under it) must not recast their fp32 [B, D] work."""
    return torch.autocast(device.type, enabled=False)


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5's MLP projector
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("regap_fast::llava_projector_forward", mutates_args=())
def _llava_forward(x2d: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                   mask_flat: Optional[Tensor], counts: Tensor, rows_per_sample: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [M, D], pooled [B, D] fp32, and for the backward: pre, h [M, D], mean(h) as hi/lo rows)."""
    impl = backends.get(backend, "projector")
    with _no_autocast(x2d.device):
        pre = _linear(x2d, w1, b1)
        h, pooled_sum = impl.gelu_pool_forward(pre, mask_flat, rows_per_sample, counts.shape[0], True)
        out = _linear(h, w2, b2)
        parts = impl.mean_split(pooled_sum, counts, x2d.dtype)
        pooled = _pooled_output(parts, w2, b2, counts.shape[0])
    return out, pooled, pre, h, parts


@_llava_forward.register_fake
def _(x2d, w1, b1, w2, b2, mask_flat, counts, rows_per_sample, backend):
    M, D, B = x2d.shape[0], w2.shape[0], counts.shape[0]
    split = 2 if x2d.dtype in (torch.float16, torch.bfloat16) else 1
    acc = accumulation_dtype(x2d.dtype)
    pre = x2d.new_empty((M, w1.shape[0]))
    return (x2d.new_empty((M, D)), x2d.new_empty((B, D), dtype=acc), pre, torch.empty_like(pre),
            x2d.new_empty((split * B, w1.shape[0])))


@torch.library.custom_op("regap_fast::llava_projector_backward", mutates_args=())
def _llava_backward(dout: Tensor, dpooled: Optional[Tensor], x2d: Tensor, w1: Tensor, w2: Tensor, pre: Tensor,
                    h: Tensor, parts: Tensor, counts: Tensor, mask_flat: Optional[Tensor], rows_per_sample: int,
                    needs: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW1, db1, dW2, db2); an empty tensor for each one not in ``needs``."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    impl = backends.get(backend, "projector")
    B, dtype = counts.shape[0], x2d.dtype
    with _no_autocast(x2d.device):
        vec = None
        if dpooled is not None:  # d pooled / d h[row] = W2 / n on the valid rows of each sample
            vec = join_hi_lo(mm_fp32(impl.mean_split(dpooled, counts, dtype), w2), B)
        dpre, db1 = impl.dgelu_backward(torch.mm(dout, w2), pre, mask_flat, rows_per_sample, vec, need_b1)
        dw2, db2 = _empty(w2), _empty(w2)  # distinct tensors: a custom op's outputs may not alias
        if need_w2:
            if dpooled is None:
                dw2 = torch.mm(dout.t(), h)
            else:  # the rank-B REGAP term first, then the big GEMM accumulates into it (no copy of C)
                dw2 = torch.mm(dpooled.to(dtype).t(), parts[:B]).addmm_(dout.t(), h)
        if need_b2:
            db2 = dout.sum(0, dtype=accumulation_dtype(dtype))
            db2 = (db2 if dpooled is None else db2.add_(dpooled.sum(0))).to(dtype)
        dw1 = torch.mm(dpre.t(), x2d) if need_w1 else _empty(w1)
        dx = torch.mm(dpre, w1) if need_x else _empty(x2d)
    return dx, dw1, db1.to(dtype) if need_b1 else _empty(w1), dw2, db2


@_llava_backward.register_fake
def _(dout, dpooled, x2d, w1, w2, pre, h, parts, counts, mask_flat, rows_per_sample, needs, backend):
    shapes = (x2d.shape, w1.shape, w1.shape[:1], w2.shape, w2.shape[:1])
    return tuple(x2d.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


def _llava_setup_context(ctx, inputs, output):
    x2d, w1, b1, w2, b2, mask_flat, counts, rows_per_sample, backend = inputs
    _, _, pre, h, parts = output
    ctx.mark_non_differentiable(pre, h, parts)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x2d, w1, w2, pre, h, parts, counts, mask_flat)
    ctx.rows_per_sample, ctx.backend = rows_per_sample, backend


def _llava_grad(ctx, dout, dpooled, *_unused):
    x2d, w1, w2, pre, h, parts, counts, mask_flat = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if (dout is None and dpooled is None) or not any(needs):
        return (None,) * 9
    if dout is None:  # only the pooled output was used
        dout = h.new_zeros(h.shape)
    grads = torch.ops.regap_fast.llava_projector_backward(dout, dpooled, x2d, w1, w2, pre, h, parts, counts,
                                                           mask_flat, ctx.rows_per_sample, needs, ctx.backend)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_llava_forward.register_autograd(_llava_grad, setup_context=_llava_setup_context)


def _counts(image_mask: Optional[Tensor], batch: int, n: int, device, dtype) -> Tensor:
    """Valid image tokens per sample, [B] in the accumulation dtype."""
    if image_mask is None:
        return torch.full((batch,), float(n), dtype=dtype, device=device)
    return image_mask.sum(1, dtype=dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here: autocast's, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def llava_projector(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                    image_mask: Optional[Tensor] = None, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``Linear(w1, b1) -> GELU -> Linear(w2, b2)`` on ``x [B, Ni, Dv]`` and the masked mean of its
    output: ``(out [B, Ni, D], pooled [B, D] fp32)``. Computes in autocast's dtype when it is on (as
    nn.Linear does), else in x's. A sample with no valid image token pools to ``b2``."""
    check_projector_input(x, image_mask, w1.shape[1])
    dtype = compute_dtype(x)
    name = backends.resolve(backend, x.device, dtype, "projector")
    B, n, _ = x.shape
    cast = [None if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2)]  # autograd sees the casts
    counts = _counts(image_mask, B, n, x.device, accumulation_dtype(dtype))
    mask_flat = None if image_mask is None else image_mask.reshape(-1)
    out, pooled, *_ = torch.ops.regap_fast.llava_projector_forward(
        cast[0].reshape(B * n, -1), *cast[1:], mask_flat, counts, n, name)
    return out.view(B, n, -1), pooled


# --------------------------------------------------------------------------------------------------
# one linear layer (MiniGPT-4, BLIP-2)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("regap_fast::linear_projector_forward", mutates_args=())
def _linear_forward(x: Tensor, w: Tensor, b: Optional[Tensor], mask: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [B, N, D], pooled [B, D] fp32, and for the backward: mean(x) as hi/lo rows, 1/n [B])."""
    B, n, k = x.shape
    with _no_autocast(x.device):
        out = _linear(x.reshape(B * n, k), w, b).view(B, n, -1)
        mean_x, inv_n = backends.get(backend).masked_mean_forward(x, mask)
        parts = backends.get(backend, "projector").mean_split(mean_x, None, x.dtype)
        pooled = _pooled_output(parts, w, b, B)
    return out, pooled, parts, inv_n


@_linear_forward.register_fake
def _(x, w, b, mask, backend):
    B, n, k = x.shape
    acc = accumulation_dtype(x.dtype)
    split = 2 if x.dtype in (torch.float16, torch.bfloat16) else 1
    return (x.new_empty((B, n, w.shape[0])), x.new_empty((B, w.shape[0]), dtype=acc),
            x.new_empty((split * B, k)), x.new_empty((B,), dtype=acc))


@torch.library.custom_op("regap_fast::linear_projector_backward", mutates_args=())
def _linear_backward(dout: Tensor, dpooled: Optional[Tensor], x: Tensor, w: Tensor, parts: Tensor, inv_n: Tensor,
                     mask: Optional[Tensor], needs: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db); an empty tensor for each one not in ``needs``."""
    need_x, need_w, need_b = needs
    B, n, k = x.shape
    dout2d, x2d, dtype = dout.reshape(B * n, -1), x.reshape(B * n, k), x.dtype
    dx, dw, db = _empty(w), _empty(w), _empty(w)  # distinct: a custom op's outputs may not alias
    with _no_autocast(x.device):
        if need_w:
            dw = (torch.mm(dout2d.t(), x2d) if dpooled is None  # else: the rank-B term, then the GEMM into it
                  else torch.mm(dpooled.to(dtype).t(), parts[:B]).addmm_(dout2d.t(), x2d))
        if need_b:
            db = dout2d.sum(0, dtype=accumulation_dtype(dtype))
            db = (db if dpooled is None else db.add_(dpooled.sum(0))).to(dtype)
        if need_x:
            dx = torch.mm(dout2d, w).view(B, n, k)
            if dpooled is not None:  # d pooled / d x[row] = W / n on the valid rows: an explicit add
                split = backends.get(backend, "projector").mean_split(dpooled * inv_n[:, None], None, dtype)
                vec = join_hi_lo(mm_fp32(split, w), B).to(dtype).unsqueeze(1)
                dx.add_(vec if mask is None else torch.where(mask.unsqueeze(-1), vec, 0))
    return dx, dw, db


@_linear_backward.register_fake
def _(dout, dpooled, x, w, parts, inv_n, mask, needs, backend):
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip((x.shape, w.shape, w.shape[:1]), needs))


def _linear_setup_context(ctx, inputs, output):
    x, w, b, mask, backend = inputs
    _, _, parts, inv_n = output
    ctx.mark_non_differentiable(parts, inv_n)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w, parts, inv_n, mask)
    ctx.backend = backend


def _linear_grad(ctx, dout, dpooled, *_unused):
    x, w, parts, inv_n, mask = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if (dout is None and dpooled is None) or not any(needs):
        return (None,) * 5
    if dout is None:
        dout = x.new_zeros((*x.shape[:2], w.shape[0]))
    grads = torch.ops.regap_fast.linear_projector_backward(dout, dpooled, x, w, parts, inv_n, mask, needs,
                                                            ctx.backend)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_linear_forward.register_autograd(_linear_grad, setup_context=_linear_setup_context)


def linear_projector(x: Tensor, w: Tensor, b: Optional[Tensor], image_mask: Optional[Tensor] = None, *,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``x W^T + b`` on ``x [B, N, K]`` and the masked mean of it: ``(out [B, N, D], pooled [B, D] fp32)``,
    the pooled output as ``masked_mean(x) W^T + b``: no pass over the outputs."""
    check_projector_input(x, image_mask, w.shape[1])
    dtype = compute_dtype(x)
    name = backends.resolve(backend, x.device, dtype, "projector")
    cast = [None if t is None else t.to(dtype) for t in (x, w, b)]
    out, pooled, _, _ = torch.ops.regap_fast.linear_projector_forward(*cast, image_mask, name)
    return out, pooled
