"""The projector modules: drop-in ``nn.Module``s over the fused projector ops (``regap_fast.ops.projector``).

``FusedLlavaProjector``  LLaVA-1.5's ``mlp2x_gelu``: Linear(Dv, D) -> GELU (exact erf) -> Linear(D, D).
``FusedLinearProjector`` one Linear (MiniGPT-4's ``llama_proj``, BLIP-2's ``language_projection``,
                         LLaVA-1.0's projector).

Both have the parameter names and shapes of the transformers/LLaVA modules they replace and
``forward(x, image_mask=None, return_pooled=False)``: without ``return_pooled`` exactly the plain
projector; with it also the masked mean of the outputs, ``[B, D]`` fp32, from the fused op.
``projector_gap_loss`` puts a projector together with ``pooled_text_embeddings`` (the caption side
from token ids) for one training step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._math import REDUCTIONS
from ._validation import check_choice, check_projector_input
from .ops import gap_from_means, linear_projector, llava_projector, pooled_text_embeddings

# LLaVA's checkpoints (mm_projector = nn.Sequential(Linear, GELU, Linear)) name the two linear
# layers "0" and "2"; transformers' LlavaMultiModalProjector names them "linear_1" and "linear_2".
LLAVA_KEY_MAP = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                 "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


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

        Without ``return_pooled`` this is exactly the plain projector. With it, ``llava_projector``: the
        hidden state is pooled in the GELU pass and the pooled output's gradient joins dh in the dGELU
        pass on the kernel backends; nothing [B, Ni, D]-sized is created for REGAP.
        """
        if not return_pooled:
            check_projector_input(x, image_mask, self.in_features)
            return self.linear_2(F.gelu(self.linear_1(x)))
        return llava_projector(x, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight, self.linear_2.bias,
                               image_mask, backend=self.backend)

    def llava_state_dict(self, prefix: str = "model.mm_projector.") -> dict[str, Tensor]:
        """The weights under LLaVA's names, e.g. for ``mm_projector.bin``."""
        inverse = {v: k for k, v in LLAVA_KEY_MAP.items()}
        return {prefix + inverse[k]: v for k, v in self.state_dict().items()}


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
        if not return_pooled:
            check_projector_input(x, image_mask, self.in_features)
            return super().forward(x)
        return linear_projector(x, self.weight, self.bias, image_mask, backend=self.backend)


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


def _valid_samples(image_mask: Optional[Tensor], caption_mask: Optional[Tensor], x: Tensor,
                   caption_ids: Tensor) -> Optional[Tensor]:
    """[B] bool: the samples with an image and a caption token (None: every sample has both)."""
    if x.shape[1] == 0 or caption_ids.shape[1] == 0:
        return x.new_zeros((x.shape[0],), dtype=torch.bool)
    flags = [m.any(1) for m in (image_mask, caption_mask) if m is not None]
    return None if not flags else flags[0] if len(flags) == 1 else flags[0] & flags[1]


def projector_gap_loss(projector: nn.Module, x: Tensor, caption_ids: Tensor, embed_weight: Tensor,
                       image_mask: Optional[Tensor] = None, caption_mask: Optional[Tensor] = None, *,
                       squared: bool = False, reduction: str = "mean"):
    """One call for a REGAP training step: ``(image_embeds, gap)``.

    ``image_embeds = projector(x)`` go to the LLM as usual; ``gap`` is ``fused_gap_loss`` of those
    embeddings against the caption's input embeddings, computed from the projector's pooled output and
    the pooled embedding rows of ``caption_ids``: neither ``[B, N, D]`` side is pooled after the fact.
    ``(lm_loss + lam * gap).backward()`` gives the gradients of the unfused computation.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(projector, (FusedLlavaProjector, FusedLinearProjector)):
        raise TypeError("projector must be a FusedLlavaProjector or FusedLinearProjector, "
                        f"got {type(projector).__name__}")
    if not isinstance(caption_ids, Tensor) or caption_ids.dim() != 2 or caption_ids.shape[0] != x.shape[0]:
        raise ValueError(f"caption_ids must have shape [B, Nt] with B={x.shape[0]}, got "
                         f"{tuple(caption_ids.shape) if isinstance(caption_ids, Tensor) else caption_ids!r}")
    image_embeds, mu_image = projector(x, image_mask, return_pooled=True)
    mu_caption = pooled_text_embeddings(caption_ids, embed_weight, caption_mask, backend=projector.backend)
    if mu_caption.shape[-1] != mu_image.shape[-1]:
        raise ValueError(f"embedding sizes differ: projector gives D={mu_image.shape[-1]}, "
                         f"embed_weight has D={mu_caption.shape[-1]}")
    valid = _valid_samples(image_mask, caption_mask, x, caption_ids)
    gap = gap_from_means(mu_image, mu_caption.to(mu_image.dtype), valid, reduction=reduction, squared=squared,
                         backend=projector.backend)
    return image_embeds, gap
