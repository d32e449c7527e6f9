"""Projectors that hand REGAP the pooled image embedding without an extra pass over the activations.

``FusedLlavaProjector``  LLaVA-1.5's ``mlp2x_gelu``: Linear(Dv, D) -> GELU (exact erf) -> Linear(D, D).
``FusedLinearProjector`` one Linear (MiniGPT-4's ``llama_proj``, BLIP-2's ``language_projection``,
                         LLaVA-1.0's projector).

Both are drop-in modules (same parameter names and shapes as the transformers/LLaVA modules they
replace) with ``forward(x, image_mask=None, return_pooled=False)``. With ``return_pooled=True`` they
also return the masked mean of their outputs, ``[B, D]`` fp32, computed from pooled *inputs of the
last linear layer* (docs/design.md, "The fused projector"), not from the outputs:

    mean_i (h_i W^T + b) = (mean_i h_i) W^T + b

``projector_gap_loss`` puts it together with ``pooled_text_embeddings`` (the caption side from token
ids) for one training step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from ._primitives import BroadcastSide
from ._validation import check_choice, check_mask
from .ops import pooled_text_embeddings
from .reference import REDUCTIONS, accumulation_dtype, gap_from_means, inv_or_zero, mean_from_sum

# LLaVA's checkpoints (mm_projector = nn.Sequential(Linear, GELU, Linear)) name the two linear
# layers "0" and "2"; transformers' LlavaMultiModalProjector names them "linear_1" and "linear_2".
LLAVA_KEY_MAP = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                 "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


def _check_projector_input(x: Tensor, image_mask: Optional[Tensor], in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, Ni, {in_features}], got {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the projector expects {in_features}")
    check_mask("image_mask", image_mask, "x", x)


class FusedLlavaProjector(nn.Module):
    """LLaVA-1.5's projector ``Linear(Dv, D) -> GELU -> Linear(D, D)`` with a fused pooled output.

    Parameter names follow transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``);
    a state dict with LLaVA's ``mm_projector`` names (``0.*``, ``2.*``) loads too (the prefix
    ``model.mm_projector.`` stripped), and ``llava_state_dict()`` writes those names back.
    """

    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)
        self.backend = backend
        self._register_load_state_dict_pre_hook(_accept_llava_names)

    @property
    def in_features(self) -> int:
        return self.linear_1.in_features

    @property
    def out_features(self) -> int:
        return self.linear_2.out_features

    def forward(self, x: Tensor, image_mask: Optional[Tensor] = None, return_pooled: bool = False):
        """x ``[B, Ni, Dv]`` -> image embeddings ``[B, Ni, D]`` (and their masked mean ``[B, D]`` fp32).

        Without ``return_pooled`` this is exactly the plain projector (cuBLAS GEMMs + GELU). With it,
        the hidden state is pooled as it is made (a GEMM epilogue on the kernel backends, one read
        of h on the torch backend) and the backward adds the pooled output's gradient where dh is
        formed anyway (``_FusedMlpGelu``): nothing [B, Ni, D]-sized is created for REGAP.
        """
        _check_projector_input(x, image_mask, self.in_features)
        if not return_pooled:
            return self.linear_2(F.gelu(self.linear_1(x)))
        dtype = _compute_dtype(x)
        name = backends.resolve(self.backend, x.device, dtype, "projector")
        return _fused_mlp_gelu(self, x.to(dtype), image_mask, backends.get(name, "projector"))

    def llava_state_dict(self, prefix: str = "model.mm_projector.") -> dict[str, Tensor]:
        """The weights under LLaVA's names, e.g. for ``mm_projector.bin``."""
        inverse = {v: k for k, v in LLAVA_KEY_MAP.items()}
        return {prefix + inverse[k]: v for k, v in self.state_dict().items()}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here: autocast's, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _valid_counts(mask: Optional[Tensor], batch: int, n: int, device, dtype) -> Tensor:
    """Valid tokens per sample, [B] in the accumulation dtype."""
    if mask is None:
        return torch.full((batch,), float(n), dtype=dtype, device=device)
    return mask.sum(1, dtype=dtype)


def _fused_mlp_gelu(proj: "FusedLlavaProjector", x: Tensor, image_mask: Optional[Tensor], impl):
    B, n, _ = x.shape
    dtype = x.dtype
    w1, w2 = proj.linear_1.weight.to(dtype), proj.linear_2.weight.to(dtype)
    b1 = None if proj.linear_1.bias is None else proj.linear_1.bias.to(dtype)
    b2 = None if proj.linear_2.bias is None else proj.linear_2.bias.to(dtype)
    mask_flat = None if image_mask is None else image_mask.reshape(-1)
    counts = _valid_counts(image_mask, B, n, x.device, accumulation_dtype(dtype))
    # the weights were cast above, where autograd sees it; nothing inside may be autocast again
    with torch.autocast(x.device.type, enabled=False):
        out, pooled = _FusedMlpGelu.apply(x.reshape(B * n, -1), w1, b1, w2, b2, mask_flat, counts, n, impl)
    return out.view(B, n, -1), pooled


class _FusedMlpGelu(torch.autograd.Function):
    """``Linear -> GELU -> Linear`` on ``[M, Dv]`` rows, plus the pooled output ``[B, D]`` (fp32).

    Saves x, pre and h, as the unfused projector does (x for dW1, pre for GELU', h for dW2), and
    ``[B, D]`` buffers; nothing ``[M, D]``-sized is created for REGAP, forward or backward.
    """

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, mask_flat, counts, rows_per_sample: int, impl):
        pre, h, pooled_sum = impl.gelu_gemm_forward(x2d, w1, b1, mask_flat, rows_per_sample, counts.shape[0],
                                                    pool=True)
        out = torch.addmm(b2, h, w2.t()) if b2 is not None else torch.mm(h, w2.t())
        pooled_h = mean_from_sum(pooled_sum, counts)
        acc = pooled_h.dtype
        pooled = F.linear(pooled_h, w2.to(acc), None if b2 is None else b2.to(acc))
        inv_n = inv_or_zero(counts)
        ctx.save_for_backward(x2d, w1, w2, pre, h, pooled_h, mask_flat, inv_n)
        ctx.rows_per_sample = rows_per_sample
        ctx.impl = impl
        return out, pooled

    @staticmethod
    def backward(ctx, dout, dpooled):
        x2d, w1, w2, pre, h, pooled_h, mask_flat, inv_n = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dtype = h.dtype
        dpooled = dpooled.to(pooled_h.dtype)
        # d pooled / d h[row] = W2 / n on valid rows: the per-sample vector the dgrad epilogue adds. In
        # W2's dtype: an fp32 copy of the [D, D] weight would cost more than the whole [B, D] product
        # (it meets dh, a gradient of that dtype, and is rounded to it in the unfused step too)
        vw2 = ((dpooled * inv_n.unsqueeze(1)).to(w2.dtype) @ w2).to(pooled_h.dtype)
        dpre, db1 = ctx.impl.dgelu_gemm_backward(dout, w2, pre, mask_flat, ctx.rows_per_sample, vw2, need_b1)
        dx = dw1 = dw2 = db2 = None
        if need_w2:
            # the pooled output's share of dW2 is dpooled^T @ pooled_h: [B, D]-sized operands
            dw2 = torch.addmm((dpooled.t() @ pooled_h).to(dtype), dout.t(), h)
        if need_b2:
            db2 = (dout.sum(0, dtype=pooled_h.dtype) + dpooled.sum(0)).to(dtype)
        if need_w1:
            dw1 = dpre.t() @ x2d
        if need_x:
            dx = dpre @ w1
        return dx, dw1, None if db1 is None else db1.to(dtype), dw2, db2, None, None, None, None


def _accept_llava_names(state_dict, prefix, *args):
    """load_state_dict pre-hook: rename LLaVA's ``0.*``/``2.*`` keys to ``linear_1.*``/``linear_2.*``."""
    for old, new in LLAVA_KEY_MAP.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class FusedLinearProjector(nn.Linear):
    """A drop-in ``nn.Linear`` projector (MiniGPT-4's ``llama_proj``) with a fused pooled output.

    For one linear layer the pooled output is ``masked_mean(x) @ W^T + b``: no pass over the outputs.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, backend: str = "auto"):
        super().__init__(in_dim, out_dim, bias=bias)
        self.backend = backend

    def forward(self, x: Tensor, image_mask: Optional[Tensor] = None, return_pooled: bool = False):
        """x ``[B, N, in]`` -> ``[B, N, out]`` (and the masked mean of the outputs ``[B, out]`` fp32)."""
        _check_projector_input(x, image_mask, self.in_features)
        if not return_pooled:
            return super().forward(x)
        dtype = _compute_dtype(x)
        impl = backends.get(backends.resolve(self.backend, x.device, dtype))
        w = self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # cast above, where autograd sees it
            return _FusedLinear.apply(x.to(dtype), w, b, image_mask, impl)


class _FusedLinear(torch.autograd.Function):
    """``x W^T + b`` and its pooled output ``masked_mean(x) W^T + b`` (fp32), for any backend.

    The pooled output's gradient costs ``[B, D]``-sized work: ``dW`` gains ``dpooled^T @ pooled_x``
    inside the one ``dW`` GEMM (as its accumulate term), ``db`` gains ``sum_b dpooled``; ``dx`` gains
    the per-sample vector ``dpooled W / n`` on the valid rows (only when x needs a gradient).
    """

    @staticmethod
    def forward(ctx, x, w, b, mask, impl):
        B, n, k = x.shape
        x2d = x.reshape(B * n, k)
        out = torch.addmm(b, x2d, w.t()) if b is not None else torch.mm(x2d, w.t())
        pooled_x, inv_n = impl.masked_mean_forward(x, mask)
        pooled = F.linear(pooled_x, w.to(pooled_x.dtype), None if b is None else b.to(pooled_x.dtype))
        ctx.save_for_backward(x, w, pooled_x, inv_n, mask)
        ctx.impl = impl
        return out.view(B, n, -1), pooled

    @staticmethod
    def backward(ctx, dout, dpooled):
        x, w, pooled_x, inv_n, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        B, n, k = x.shape
        dout2d = dout.reshape(B * n, -1)
        dpooled = dpooled.to(pooled_x.dtype)
        dx = dw = db = None
        if need_w:
            dw = torch.addmm((dpooled.t() @ pooled_x).to(w.dtype), dout2d.t(), x.reshape(B * n, k))
        if need_b:
            db = (dout2d.sum(0, dtype=pooled_x.dtype) + dpooled.sum(0)).to(w.dtype)
        if need_x:
            one = inv_n.new_ones(())
            vec, _ = ctx.impl.broadcast_rows(dpooled @ w.to(pooled_x.dtype), one, one,
                                             BroadcastSide(inv_n, n, mask), None, x.dtype)
            # the per-sample vector ([B, 1, k] without a mask) as the accumulate input of the dgrad
            # GEMM: expanded with stride 0, W with stride 0 over the batch, no extra [B, N, k] pass
            dx = torch.baddbmm(vec.expand(B, n, k), dout2d.view(B, n, -1), w.unsqueeze(0).expand(B, -1, -1))
        return dx, dw, db, None, None


# where other projects keep their projector's weights inside a bigger state dict, tried in this order:
# MiniGPT-4 (llama_proj), transformers' BLIP-2 (language_projection), LLaVA (model.mm_projector, also
# LLaVA-1.0's single linear layer), transformers' LLaVA (multi_modal_projector), regap_fast (projector)
PROJECTOR_KEY_PREFIXES = ("llama_proj.", "language_projection.", "mm_projector.", "multi_modal_projector.",
                          "projector.")


def projector_state_dict(state_dict: dict, prefixes: tuple = PROJECTOR_KEY_PREFIXES) -> dict:
    """The projector's own weights out of another project's checkpoint, the prefix stripped.

    ``{"llama_proj.weight", "llama_proj.bias", <anything else>}`` (MiniGPT-4's stage-1 checkpoint, its
    ``"model"`` dict) gives ``{"weight", "bias"}``, which ``FusedLinearProjector.load_state_dict``
    takes; likewise BLIP-2's ``language_projection.*`` and LLaVA's ``model.mm_projector.*`` (``0.*``,
    ``2.*``: ``FusedLlavaProjector`` accepts those names). A prefix may sit under any parent module
    (``model.``, ``module.``); the first of ``prefixes`` found wins. KeyError when none is there, or
    when one prefix sits under two different parents (two projectors: ambiguous).
    """
    for prefix in prefixes:
        found: dict[str, dict] = {}
        for key, value in state_dict.items():
            at = 0 if key.startswith(prefix) else key.find("." + prefix) + 1
            if at > 0 or key.startswith(prefix):
                found.setdefault(key[:at], {})[key[at + len(prefix):]] = value
        if len(found) > 1:
            raise KeyError(f"several projectors under {prefix!r}: {sorted(p + prefix for p in found)}")
        if found:
            return next(iter(found.values()))
    raise KeyError(f"no projector weights found (looked for keys with {list(prefixes)}); keys: "
                   f"{sorted(state_dict)[:8]}")


def _any_valid(mask: Optional[Tensor], batch: int, n: int, device) -> Tensor:
    if mask is None:
        return torch.full((batch,), n > 0, dtype=torch.bool, device=device)
    return mask.any(dim=1)


def projector_gap_loss(projector: nn.Module, x: Tensor, caption_ids: Tensor, embed_weight: Tensor,
                       image_mask: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, *,
                       squared: bool = False, reduction: str = "mean"):
    """One call for a REGAP training step: ``(image_embeds, gap)``.

    ``image_embeds = projector(x)`` go to the LLM as usual; ``gap`` is ``fused_gap_loss`` of those
    embeddings against the caption's input embeddings, computed from the pooled projector input and
    the pooled embedding rows of ``caption_ids`` — neither ``[B, N, D]`` side is pooled after the fact.
    ``(lm_loss + lam * gap).backward()`` gives the gradients of the unfused computation.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(projector, (FusedLlavaProjector, FusedLinearProjector)):
        raise TypeError("projector must be a FusedLlavaProjector or FusedLinearProjector, "
                        f"got {type(projector).__name__}")
    if caption_ids.dim() != 2 or caption_ids.shape[0] != x.shape[0]:
        raise ValueError(f"caption_ids must have shape [B, Nt] with B={x.shape[0]}, got {tuple(caption_ids.shape)}")
    image_embeds, mu_image = projector(x, image_mask, return_pooled=True)
    mu_text = pooled_text_embeddings(caption_ids, embed_weight, text_mask, backend=projector.backend)
    if mu_text.shape[-1] != mu_image.shape[-1]:
        raise ValueError(f"embedding sizes differ: projector gives D={mu_image.shape[-1]}, "
                         f"embed_weight has D={mu_text.shape[-1]}")
    valid = _any_valid(image_mask, x.shape[0], x.shape[1], x.device) & \
        _any_valid(text_mask, caption_ids.shape[0], caption_ids.shape[1], x.device)
    gap = gap_from_means(mu_image, mu_text.to(mu_image.dtype), valid, reduction=reduction, squared=squared)
    return image_embeds, gap
