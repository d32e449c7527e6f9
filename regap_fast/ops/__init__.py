"""The functional API: every op a ``torch.library`` custom op with a fake implementation and a registered
autograd formula (so ``torch.compile(fullgraph=True)`` traces them and ``torch.library.opcheck`` passes),
inputs checked and the backend chosen in Python before the op runs. In eager mode the same functions run
under a plain ``torch.autograd.Function``, without the custom op's dispatch (``_dispatch.py``).

==========================  ===========================================  ================
functional                  custom ops                                   module
==========================  ===========================================  ================
``fused_gap_loss``          ``gap_loss_forward``, ``_backward``          ``gap_loss.py``
``gap_from_means``          (``fused_gap_loss`` on [B, 1, D] means)      ``gap_loss.py``
``masked_mean``             ``masked_mean_forward``, ``_backward``       ``gap_loss.py``
``pooled_text_embeddings``  ``gather_mean_forward``                      ``text_pool.py``
``llava_projector``         ``llava_projector_forward``, ``_backward``   ``projector.py``
``linear_projector``        ``linear_projector_forward``, ``_backward``  ``projector.py``
==========================  ===========================================  ================

The modules (``FusedLlavaProjector``, ``FusedLinearProjector``) are in ``regap_fast.projector``.
"""

from .gap_loss import fused_gap_loss, gap_from_means, masked_mean
from .projector import linear_projector, llava_projector
from .text_pool import pooled_text_embeddings

__all__ = ["fused_gap_loss", "gap_from_means", "linear_projector", "llava_projector", "masked_mean",
           "pooled_text_embeddings"]
