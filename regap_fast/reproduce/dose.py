"""The dose-response of PLAN-v3 section 6.4: image tokens moved along the mean-gap direction at evaluation.

``gap_direction`` measures d = c_text - c_image at the LLM input over image-caption pairs (the centroids
of the per-pair mean caption embedding and mean image-token embedding, as ``measure_gap`` defines
them). Inside ``shifted_images(vlm, d, t)`` the projector's output is moved by t * d, so every image
token of every image is; the per-pair image mean moves by t * d and so does its centroid: at t = 1 the
image centroid sits on the caption centroid (the gap at the LLM input, as centroid distance, is closed),
at t = 0 nothing changes. Generation and ``pair_embeddings`` both go through the projector, so both see
the shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

DOSES = (0.0, 0.25, 0.5, 0.75, 1.0)  # PLAN-v3 6.4


def centroids(vlm, images: Sequence, captions: Sequence[str], batch_size: int = 64):
    """(c_image, c_text): the means over pairs of the per-pair mean image-token and caption embeddings."""
    import torch

    sums, n = None, 0
    for start in range(0, len(images), batch_size):
        e = vlm.pair_embeddings(images[start:start + batch_size], captions[start:start + batch_size])
        mu_image = e["image_embeds"].float().mean(1)
        mask = e["text_mask"].unsqueeze(-1).float()
        mu_text = (e["text_embeds"].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        part = torch.stack([mu_image.sum(0), mu_text.sum(0)])
        sums = part if sums is None else sums + part
        n += mu_image.shape[0]
    if not n:
        raise ValueError("no pairs to measure the gap direction on")
    return sums[0] / n, sums[1] / n


def gap_direction(vlm, images: Sequence, captions: Sequence[str], batch_size: int = 64):
    """d = c_text - c_image at the LLM input (a vector of the LM's hidden size)."""
    c_image, c_text = centroids(vlm, images, captions, batch_size)
    return c_text - c_image


@contextmanager
def shifted_images(vlm, direction, t: float):
    """Within the block, the projector's outputs (the image tokens at the LLM input) are moved by t * direction."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t:g}")

    def hook(_module, _inputs, output):
        return output + t * direction.to(output.dtype).to(output.device)

    handle = vlm.projector.register_forward_hook(hook)
    try:
        yield vlm
    finally:
        handle.remove()
