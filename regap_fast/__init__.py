"""regap_fast: the REGAP modality-gap regulariser (arXiv 2505.24208) as fused GPU kernels.

    loss = regap_fast.fused_gap_loss(image_embeds, text_embeds, image_mask, text_mask)

See README.md for the API, the training loop and the tools.
"""

import importlib
import importlib.util
import sys

__version__ = "0.1.0"


class _TorchBeforeExtension:
    """``import regap_fast._C`` (the CUDA extension) links against torch's shared libraries, which only
    ``import torch`` loads: without this, that import in a fresh interpreter fails on libc10.so."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == f"{__name__}._C":
            import torch  # noqa: F401
        return None  # the usual finders load the extension


if _TorchBeforeExtension not in sys.meta_path:
    sys.meta_path.insert(0, _TorchBeforeExtension)

# public name -> the module that defines it, imported on first use: `regap-fast --help` and argument
# errors import this package and must not pay for torch (seconds) or transformers (more seconds)
_EXPORTS = {
    "BackendUnavailable": ".backends",
    "fused_gap_loss": ".ops", "gap_from_means": ".ops", "masked_mean": ".ops", "pooled_text_embeddings": ".ops",
    "llava_projector": ".ops", "linear_projector": ".ops",
    "FusedLinearProjector": ".projector", "FusedLlavaProjector": ".projector", "projector_gap_loss": ".projector",
    "gap_from_means_reference": ".reference", "gap_loss_reference": ".reference",
    "masked_mean_reference": ".reference",
    "apply_regap": ".integrations.transformers", "remove_regap": ".integrations.transformers",
    "RegapCallback": ".integrations.transformers", "RegapError": ".core", "modality_gap": ".core",
    "modality_integration_rate": ".eval.mir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: regap_fast.backends, ...
    else:
        raise AttributeError(f"module 'regap_fast' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
