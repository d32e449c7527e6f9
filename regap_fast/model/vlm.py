"""The model: vision tower + projector + causal LM + tokenizer (docs/model-api.md).

    pixels -> vision tower (features of one layer) -> projector -> image tokens
    text   -> token ids, the image placeholder expanded to ``num_image_tokens`` slots
    the image tokens are written into their slots of the LM's input embeddings (the LLaVA splice)
    -> causal LM; the loss on answer (caption) tokens only; REGAP on the projector outputs

How the vision side and the projector are built is the architecture's (``archs.py``); building a whole
model is ``build.py``, writing its files ``checkpoints.py``, analysis and generation ``inference.py``
(loading a saved one, ``loading.py``, comes above this module).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import IGNORE_INDEX
from ..core import gap_samples, modality_gap
from ..data.llava import Encoder, ImageTransform
from ..gap_layer import LayerOutput
from .archs import get_arch
from .build import build_from_config, build_from_parts
from .checkpoints import is_peft, read_projector_weights, save_model
from .config import COMPONENTS, ModelConfig, prepare_tokenizer, resolve_attn_implementation
from .inference import InferenceMixin

log = logging.getLogger(__name__)


class VisionLanguageModel(InferenceMixin, nn.Module):
    """Vision tower + projector + causal LM + tokenizer, with the LLaVA splice and the REGAP loss."""

    def __init__(self, config: ModelConfig, vision_tower: nn.Module, projector: nn.Module,
                 language_model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.arch = get_arch(config.arch)
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.image_transform  # an unknown config.image_aspect_ratio fails here, not at the first image
        vocab = self.language_model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the LM's embedding only {vocab}")

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Optional[ModelConfig] = None, tokenizer=None, *, device=None,
                    dtype: Optional[torch.dtype] = None) -> "VisionLanguageModel":
        """Random weights from configs (the tiny defaults where a config is None); with no tokenizer,
        the embedded default (a BPE trained offline on the synthetic captions)."""
        return build_from_config(cls, config, tokenizer, device=device, dtype=dtype)

    @classmethod
    def from_pretrained_parts(cls, vision_path: str, lm_path: str, *, config: Optional[ModelConfig] = None,
                              tokenizer_path: Optional[str] = None, device=None,
                              dtype: Optional[torch.dtype] = None,
                              projector_weights: Optional[str] = None) -> "VisionLanguageModel":
        """A pretrained vision side and LM (e.g. Vicuna-7B) from local folders, and a new projector
        (random init, as in stage 1; or ``projector_weights``, see ``load_projector_weights``).

        The vision side, by ``config.arch``: ``llava``, a CLIP folder (openai/clip-vit-large-patch14-336);
        ``minigpt4``, a transformers BLIP-2 folder (e.g. Salesforce/blip2-flan-t5-xxl), of which only
        the ViT, the query tokens and the Q-Former are read."""
        return build_from_parts(cls, vision_path, lm_path, config=config, tokenizer_path=tokenizer_path,
                                device=device, dtype=dtype, projector_weights=projector_weights)

    def save_pretrained(self, save_dir: str | Path, components: Sequence[str] = COMPONENTS, *,
                        state_dict: Optional[dict] = None) -> Path:
        """config.json, model.safetensors (the weights of ``components``), tokenizer files.

        Leaving out a component loaded from a path (e.g. a frozen 7B LM after stage 1) saves only what
        changed; ``load_model`` then reads that component from its recorded path. ``state_dict`` (full
        names, e.g. gathered from FSDP shards) replaces the module's own tensors.
        """
        return save_model(self, save_dir, components, state_dict=state_dict)

    def set_attn_implementation(self, requested: str = "auto") -> str:
        """Switch the vision tower's and the LM's attention kernels ('auto': see resolve_attn_implementation)."""
        impl = resolve_attn_implementation(requested)
        for m in (self.vision_tower, self.language_model):
            m.set_attn_implementation(impl)
        self.config.attn_implementation = impl
        return impl

    def merge_lora(self) -> "VisionLanguageModel":
        """Fold LoRA adapters (peft) into the LM's weights, leaving a plain transformers model."""
        if is_peft(self.language_model):
            self.language_model = self.language_model.merge_and_unload()
        return self

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        """Training mode, except for the frozen parts of the vision side (the whole tower, or e.g. a frozen
        Q-Former whose dropout MiniGPT-4 keeps off): they stay in eval mode, as LLaVA and MiniGPT-4 keep them.
        (The LM keeps the mode asked for: it is on the backward path, where gradient checkpointing needs it.)"""
        super().train(mode)
        if mode:
            for m in (self.vision_tower, *self.vision_tower.children()):
                if not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    # -- properties -------------------------------------------------------------------------------

    @property
    def num_image_tokens(self) -> int:
        return self.arch.num_image_tokens(self.config)

    @property
    def image_size(self) -> int:
        return self.arch.image_size(self.config)

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def encoder(self, fmt: str = "plain", max_length: Optional[int] = None) -> Encoder:
        """Text -> token ids, labels and masks for this model (``plain``: stage 1; ``chat``: stage 2)."""
        return Encoder(self.tokenizer, self.num_image_tokens, fmt, max_length, image_wrap=self.image_wrap,
                       plain_end=self.arch.plain_end)

    @property
    def image_transform(self) -> ImageTransform:
        """PIL image -> the vision tower's pixels: the arch's resize, ``config.image_aspect_ratio`` ("pad":
        LLaVA-1.5's square of the mean colour first), the config's mean and std."""
        return ImageTransform(self.image_size, tuple(self.config.image_mean), tuple(self.config.image_std),
                              resize=self.arch.image_resize, aspect=self.config.image_aspect_ratio)

    @property
    def image_wrap(self) -> tuple[str, str]:
        """The text before and after the image tokens in every prompt (minigpt4: ``<Img>``, ``</Img>``)."""
        return tuple(self.config.image_wrap) if self.config.image_wrap is not None else self.arch.image_wrap

    def vision_blocks(self) -> tuple[list, int]:
        """(the vision tower's transformer blocks in order, how many of the first ones the image features
        go through): what a recipe that trains part of the tower chooses from."""
        return self.arch.vision_blocks(self.vision_tower, self.config)

    def load_projector_weights(self, path: str | Path) -> "VisionLanguageModel":
        """Projector weights from another project's checkpoint: MiniGPT-4's stage-1 ``.pth`` (``{"model":
        {"llama_proj.weight", "llama_proj.bias"}}``), LLaVA's ``mm_projector.bin``, a state dict with
        BLIP-2's ``language_projection.*``; ``.pth``/``.bin``/``.pt`` (read with ``weights_only``) or
        ``.safetensors``. The shapes must match this model's projector."""
        weights = read_projector_weights(path)
        try:
            self.projector.load_state_dict(weights)  # copied into the projector's dtype
        except RuntimeError as exc:
            raise ValueError(f"{path}: the projector weights do not fit this model's "
                             f"{type(self.projector).__name__}: {exc}") from None
        log.info("projector weights loaded from %s", path)
        return self

    # -- images -----------------------------------------------------------------------------------

    def preprocess_images(self, images: Sequence) -> Tensor:
        """PIL images -> ``[B, 3, H, W]`` normalised pixel values (CPU, fp32)."""
        return torch.stack([self.image_transform(im) for im in images])

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, Ni, Dv]`` vision features (chosen layer, CLS dropped).

        No autograd graph through a frozen tower (it would only cost memory)."""
        tower_params = list(self.vision_tower.parameters())
        trainable = any(p.requires_grad for p in tower_params)
        pixel_values = pixel_values.to(device=tower_params[0].device, dtype=tower_params[0].dtype)
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.arch.encode(self.vision_tower, pixel_values, self.config)

    def _splice(self, inputs_embeds: Tensor, image_embeds: Tensor, image_mask: Tensor) -> Tensor:
        """Write the image tokens (in order, image by image) into their slots of the input embeddings."""
        per_sample = image_mask.sum(1).tolist()
        n = self.num_image_tokens
        if any(c not in (0, n) for c in per_sample) or sum(per_sample) != image_embeds.shape[0] * n:
            raise ValueError(f"image_mask must mark {n} slots in each sample with an image "
                             f"({image_embeds.shape[0]} images), got {per_sample}")
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1),
                                            image_embeds.to(inputs_embeds.dtype))

    # -- training forward -------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None,
                image_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                caption_mask: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                regap_weight: float = 0.0, compute_gap: bool = False, regap_squared: bool = False,
                full_logits: bool = False, output_hidden_states: bool = False, regap_layer: int = 0,
                caption_norms: bool = False) -> dict:
        """The loss of a batch (the Collator's tensors).

        Returns a dict: ``loss`` (= lm_loss + regap_weight * gap), ``lm_loss`` (mean over label
        tokens), ``gap`` (mean over samples with image and caption; None unless ``regap_weight > 0``
        or ``compute_gap``) and the sums and counts behind them (``lm_loss_sum``, ``num_tokens``,
        ``gap_sum``, ``num_gap_samples``) so that a trainer can normalise over a global batch;
        ``logits`` (at the label positions only unless ``full_logits``), ``hidden_states``.

        ``regap_layer`` k >= 1: the gap after decoder layer k (``regap_fast.gap_layer``; the image and caption
        positions of the sequence) instead of at the LLM input. ``caption_norms``: also ``caption_norm_sum``
        and ``caption_tokens``, the summed L2 norms of the caption tokens where the gap is taken (the
        text-norm scale's estimate).

        With right padding and a causal LM the attention mask changes nothing at the positions that
        carry a label, so passing none lets SDPA run its flash kernel.
        """
        embed = self.language_model.get_input_embeddings()
        input_ids = input_ids.to(embed.weight.device)
        inputs_embeds = embed(input_ids)
        gap_sum = num_gap = None
        want_gap = pixel_values is not None and (regap_weight > 0 or compute_gap)
        norms = {}
        if want_gap and caption_norms and regap_layer == 0:
            norms = _caption_norms(inputs_embeds, caption_mask)
        if pixel_values is not None:
            inputs_embeds, gap_sum, num_gap = self._splice_images(
                inputs_embeds, input_ids, pixel_values, image_mask, caption_mask,
                want_gap=want_gap and regap_layer == 0, squared=regap_squared)

        keep = 0  # all positions
        if labels is not None:
            labels = labels.to(input_ids.device)
            if not full_logits:  # the LM head only where a label follows (stage 1: the caption, not 576 image slots)
                keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        layer_out = LayerOutput(self.language_model, regap_layer) if want_gap and regap_layer > 0 else None
        with layer_out or contextlib.nullcontext() as seen:
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False,
                                      output_hidden_states=output_hidden_states, logits_to_keep=keep)
        if layer_out is not None:
            gap_sum, num_gap, norms = _gap_after_layer(seen[0], image_mask, caption_mask, regap_squared, caption_norms)
        result = {"logits": out.logits, "hidden_states": out.hidden_states if output_hidden_states else None,
                  "gap_sum": gap_sum, "num_gap_samples": num_gap, "gap": None, **norms}
        if gap_sum is not None:
            result["gap"] = gap_sum / num_gap.clamp(min=1)
        if labels is None:
            return result
        result.update(self._lm_loss(out.logits, labels, keep, text_only=pixel_values is None))
        result["loss"] = result["lm_loss"] + (regap_weight * result["gap"] if regap_weight > 0 else 0)
        return result

    def _splice_images(self, inputs_embeds: Tensor, input_ids: Tensor, pixel_values: Tensor,
                       image_mask: Optional[Tensor], caption_mask: Optional[Tensor], *,
                       want_gap: bool, squared: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """(the input embeddings with the image tokens in their slots, REGAP's summed gap, the number of
        samples it covers); the gap, when wanted, comes out of the projector's fused pass."""
        if image_mask is None:
            raise ValueError("pixel_values given without image_mask")
        image_mask = image_mask.to(input_ids.device)
        feats = self.encode_images(pixel_values)
        gap_sum = num_gap = None
        if want_gap:  # lambda = 0 never gets here: REGAP costs nothing when off
            if caption_mask is None:
                raise ValueError("REGAP needs caption_mask")
            caption = caption_mask.to(input_ids.device)
            image_embeds, pooled = self.projector(feats, return_pooled=True)  # one mean per image, fused
            gap_sum = modality_gap(pooled, input_ids, image_mask, caption, reduction="sum", squared=squared,
                                   embedding_weight=self.language_model.get_input_embeddings().weight,
                                   backend=self.projector.backend)
            num_gap = gap_samples(image_mask, caption).sum()
        else:
            image_embeds = self.projector(feats)
        return self._splice(inputs_embeds, image_embeds, image_mask), gap_sum, num_gap

    def _lm_loss(self, logits: Tensor, labels: Tensor, keep, *, text_only: bool) -> dict:
        """Summed next-token cross entropy over the labelled tokens, their number, and their mean.
        ``keep``: 0 (logits at every position) or the positions whose logits were kept."""
        target = labels[:, 1:] if isinstance(keep, int) else labels[:, keep + 1]
        logits = logits[:, :-1] if isinstance(keep, int) else logits
        lm_sum = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        n_tok = (target != IGNORE_INDEX).sum()
        if text_only and torch.is_grad_enabled():
            # a batch without images (text-only records of stage-2 data) still gives the projector (and any
            # trained vision block) a (zero) gradient: DDP and FSDP expect one for every trained parameter
            trained = [p for m in (self.projector, self.vision_tower) for p in m.parameters() if p.requires_grad]
            if trained:
                lm_sum = lm_sum + 0.0 * sum(p.sum() for p in trained)
        return {"lm_loss_sum": lm_sum, "num_tokens": n_tok, "lm_loss": lm_sum / n_tok.clamp(min=1)}


def _caption_norms(hidden: Tensor, caption_mask: Optional[Tensor]) -> dict:
    """The summed L2 norms of the caption rows (detached, fp64) and their number: the text-norm scale's input."""
    if caption_mask is None:
        raise ValueError("REGAP needs caption_mask")
    rows = hidden.detach()[caption_mask.to(hidden.device)]
    return {"caption_norm_sum": torch.linalg.vector_norm(rows.double(), dim=-1).sum(),
            "caption_tokens": torch.tensor(rows.shape[0], device=hidden.device)}


def _gap_after_layer(hidden: Tensor, image_mask: Tensor, caption_mask: Optional[Tensor], squared: bool,
                     caption_norms: bool) -> tuple[Tensor, Tensor, dict]:
    """(summed gap, samples, caption norms) after decoder layer k, at the sequence's image and caption positions."""
    if caption_mask is None:
        raise ValueError("REGAP needs caption_mask")
    positions, caption = image_mask.to(hidden.device), caption_mask.to(hidden.device)
    gap_sum = modality_gap(hidden, hidden, positions, caption, reduction="sum", squared=squared)
    return gap_sum, gap_samples(positions, caption).sum(), _caption_norms(hidden, caption) if caption_norms else {}
