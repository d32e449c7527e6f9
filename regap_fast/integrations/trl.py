"""REGAP with TRL's ``SFTTrainer``.

TRL (>= 1.x) computes the SFT loss itself, from per-token log-probabilities of a fused LM head that it
patches onto the model's forward, so the ``loss`` a patched model returns never reaches the optimiser.
``RegapSFTTrainer`` adds the REGAP term of each forward to TRL's loss, and takes the special tokens of
the processing class (chat-template markers such as an end-of-turn token its labels cover) out of the
caption tokens. Like ``RegapCallback.attach`` for the Trainer, it weighs each optimizer step's gaps as one
mean over the effective batch (all micro-batches, all ranks), so lambda means the same at any gradient
accumulation:

    apply_regap(model, regap_weight=0.1)
    trainer = RegapSFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., processing_class=processor)
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from ..core import RegapError
from .transformers import RegapCallback, _wrap_outermost, patched_module


class RegapSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is TRL's SFT loss + ``regap_weight * gap`` (the default ``nll`` loss path)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patched = patched_module(self.model)
        if patched is None:
            raise RegapError("RegapSFTTrainer needs a model patched with regap_fast.apply_regap(model) first")
        if self.compute_loss_func is not None or self.label_smoother is not None:
            raise RegapError("RegapSFTTrainer supports TRL's default loss only (no compute_loss_func, no label "
                             "smoothing): those paths run the forward without labels")
        self._regap = patched._regap
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        specials = torch.tensor(getattr(tokenizer, "all_special_ids", []), dtype=torch.long)
        self._regap.special_ids = torch.unique(torch.cat([self._regap.special_ids, specials]))
        _wrap_outermost(patched, self._regap)  # around TRL's fused LM head, which bypasses inner forwards
        RegapCallback.attach(self, term_in_model_loss=False)  # the term joins TRL's loss after its own scaling

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._regap.last_regap_term = None
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        term = self._regap.last_regap_term
        if term is None:  # no labels or images in this batch, or weight 0
            return result
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term
