"""Input checks shared by every public op: clear errors before any kernel launch."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tokens(name: str, x) -> None:
    """A ``[B, N, D]`` floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, D], got {x.dim()} dimensions {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have a non-empty batch and feature size, got shape {tuple(x.shape)}")


def check_mask(name: str, mask, tokens_name: str, tokens: torch.Tensor) -> None:
    """None, or a ``[B, N]`` bool tensor on the tokens' device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = the token counts), got {mask.dtype}; "
                        f"convert with {name}.bool()")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name} must have shape [B, N] = {tuple(tokens.shape[:2])} to match {tokens_name}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != tokens.device:
        raise ValueError(f"{name} is on {mask.device} but {tokens_name} is on {tokens.device}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Two token tensors that are pooled against each other: same batch, width, dtype, device."""
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a_name} has B={a.shape[0]}, {b_name} has B={b.shape[0]}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding sizes differ: {a_name} has D={a.shape[-1]}, {b_name} has D={b.shape[-1]}")


def check_means(mu_image, mu_caption, valid) -> None:
    """Two ``[B, D]`` pooled sides and an optional ``[B]`` bool validity flag."""
    for name, t in (("mu_image", mu_image), ("mu_caption", mu_caption)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if mu_image.shape != mu_caption.shape:
        raise ValueError(f"mu_image {tuple(mu_image.shape)} and mu_caption {tuple(mu_caption.shape)} differ in shape")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != mu_image.shape[:1]:
            raise ValueError(f"valid must be a [B] = [{mu_image.shape[0]}] bool tensor or None")
        if valid.device != mu_image.device:
            raise ValueError(f"valid is on {valid.device} but mu_image is on {mu_image.device}")


def check_projector_input(x, image_mask, in_features: int) -> None:
    """Vision features ``[B, Ni, in_features]`` and an optional ``[B, Ni]`` image mask."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, Ni, {in_features}], got {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the projector expects {in_features}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    check_mask("image_mask", image_mask, "x", x)
