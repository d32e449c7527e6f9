"""regap_fast: the REGAP modality-gap regulariser (arXiv 2505.24208) as fused GPU kernels.

    loss = regap_fast.fused_gap_loss(image_embeds, text_embeds, image_mask, text_mask)

See README.md for the API, the training loop and the tools.
"""

from .backends import BackendUnavailable
from .ops import fused_gap_loss, masked_mean, pooled_text_embeddings
from .projector import FusedLinearProjector, FusedLlavaProjector, projector_gap_loss
from .reference import gap_from_means, gap_loss_reference, masked_mean_reference

__version__ = "0.1.0"

# the transformers integration imports transformers (seconds): loaded on first use
_INTEGRATION_NAMES = ("apply_regap", "remove_regap", "RegapCallback")


def __getattr__(name):
    if name in _INTEGRATION_NAMES:
        from .integrations import transformers as integration
        return getattr(integration, name)
    raise AttributeError(f"module 'regap_fast' has no attribute {name!r}")


__all__ = [
    "BackendUnavailable",
    "RegapCallback",
    "FusedLinearProjector",
    "FusedLlavaProjector",
    "apply_regap",
    "fused_gap_loss",
    "gap_from_means",
    "gap_loss_reference",
    "masked_mean",
    "masked_mean_reference",
    "pooled_text_embeddings",
    "projector_gap_loss",
    "remove_regap",
]
