"""The architectures: the vision side and the projector of each family the model supports.

    llava     CLIP ViT (features of one layer, CLS dropped) -> FusedLlavaProjector (Linear-GELU-Linear)
    minigpt4  BLIP-2 ViT -> Q-Former (learned query tokens) -> FusedLinearProjector (MiniGPT-4's
              ``llama_proj``), the image tokens wrapped ``<Img>`` ... ``</Img>`` in the prompt

An architecture is a small stateless object: how to build and load its vision side, its projector,
how many image tokens it gives and how images reach it. ``ARCHS`` names them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.llava import PLAIN_SEPARATOR
from ..projector import FusedLinearProjector, FusedLlavaProjector
from .config import TINY_BLIP2, TINY_CLIP, ModelConfig, hf_config


class LlavaArch:
    """LLaVA-1.5: a CLIP ViT, the features of one layer (CLS dropped), a 2-layer GELU MLP projector."""

    name = "llava"
    tiny_vision_config = TINY_CLIP
    image_wrap = ("", "")  # text around the image tokens in the prompt
    image_resize = "crop"  # CLIP's preprocessing: shortest side to the size, centre crop
    plain_end = PLAIN_SEPARATOR  # what ends a caption in the plain (stage-1) format: LLaVA's separator

    def build_vision(self, config: ModelConfig, attn: str) -> nn.Module:
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel(hf_config(config.vision_config))
        tower.set_attn_implementation(attn)
        return tower

    def load_vision(self, path: str, attn: str, dtype: torch.dtype) -> nn.Module:
        from transformers import CLIPVisionModel  # reads a CLIPVisionModel or a full CLIPModel folder

        return CLIPVisionModel.from_pretrained(path, attn_implementation=attn, dtype=dtype)

    def build_projector(self, config: ModelConfig, vision_tower: nn.Module, text_dim: int) -> nn.Module:
        return FusedLlavaProjector(vision_tower.config.hidden_size, text_dim, bias=config.projector_bias,
                                   backend=config.projector_backend)

    def image_size(self, config: ModelConfig) -> int:
        return int(config.vision_config["image_size"])

    def num_image_tokens(self, config: ModelConfig) -> int:
        side = self.image_size(config) // int(config.vision_config["patch_size"])
        return side * side + (config.vision_feature_select == "full")

    def encode(self, vision_tower: nn.Module, pixel_values: Tensor, config: ModelConfig) -> Tensor:
        out = vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[config.vision_feature_layer]
        return feats[:, 1:] if config.vision_feature_select == "default" else feats

    def vision_blocks(self, vision_tower: nn.Module, config: ModelConfig) -> tuple[list, int]:
        """(the tower's transformer blocks in order, how many of them the features go through): with
        LLaVA's penultimate-layer features the last block's output is never used."""
        body = getattr(vision_tower, "vision_model", vision_tower)  # CLIPVisionModel: flat in transformers 5
        layers = list(body.encoder.layers)
        return layers, config.vision_feature_layer % (len(layers) + 1)


@functools.cache
def qformer_tower_class():
    """``Blip2VisionQFormer``: BLIP-2's vision side as one transformers model (made on first use, so
    that importing this module does not import transformers' BLIP-2).

    ``vision_model`` (``Blip2VisionModel``: the ViT, its last LayerNorm = MiniGPT-4's ``ln_vision``),
    ``query_tokens`` ``[1, Q, Hq]`` and ``qformer`` (``Blip2QFormerModel``): the names of
    ``Blip2ForConditionalGeneration`` / ``Blip2Model``, so ``from_pretrained`` on a transformers BLIP-2
    folder reads exactly those tensors and leaves its language model (OPT, Flan-T5) on the disk.
    ``forward(pixel_values)`` gives the Q-Former's outputs ``[B, Q, Hq]``: the projector's input.
    """
    from transformers import Blip2Config
    from transformers import initialization as init
    from transformers.models.blip_2.modeling_blip_2 import (Blip2PreTrainedModel, Blip2QFormerModel,
                                                            Blip2VisionModel)

    class Blip2VisionQFormer(Blip2PreTrainedModel):
        config_class = Blip2Config
        main_input_name = "pixel_values"
        _keys_to_ignore_on_load_unexpected = [r"^language_model\.", r"^language_projection\."]

        def __init__(self, config: Blip2Config):
            super().__init__(config)
            self.vision_model = Blip2VisionModel._from_config(config.vision_config)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
            self.post_init()

        @torch.no_grad()
        def _init_weights(self, module):
            super()._init_weights(module)
            if module is self:  # BLIP-2/MiniGPT-4 draw the query tokens from N(0, 0.02); zeros would make them equal
                init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)

        def set_attn_implementation(self, attn_implementation: str, **kwargs):
            self.vision_model.set_attn_implementation(attn_implementation, **kwargs)
            # transformers' Q-Former has no FlashAttention-2 path
            q_impl = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
            self.qformer.set_attn_implementation(q_impl, **kwargs)

        def forward(self, pixel_values: Tensor) -> Tensor:
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            return self.qformer(query_embeds=query, encoder_hidden_states=image_embeds).last_hidden_state

    return Blip2VisionQFormer


class MiniGPT4Arch:
    """MiniGPT-4: a BLIP-2 ViT and Q-Former (32 learned query tokens) feed one linear layer (``llama_proj``).

    ``vision_config`` is a transformers ``Blip2Config`` dict (``vision_config``, ``qformer_config``,
    ``num_query_tokens``; its ``text_config`` is not used: the LM is the VisionLanguageModel's).
    """

    name = "minigpt4"
    tiny_vision_config = TINY_BLIP2
    image_wrap = ("<Img>", "</Img>")  # MiniGPT-4's prompts: "<Img><ImageHere></Img> ..."
    image_resize = "square"  # BLIP-2's preprocessing: resize to size x size (no crop), CLIP's mean and std
    plain_end = None  # the tokenizer's EOS ends a caption in the plain format

    def build_vision(self, config: ModelConfig, attn: str) -> nn.Module:
        tower = qformer_tower_class()(hf_config(config.vision_config))
        tower.set_attn_implementation(attn)
        return tower

    def load_vision(self, path: str, attn: str, dtype: torch.dtype) -> nn.Module:
        """From a transformers BLIP-2 folder (``Blip2ForConditionalGeneration``, ``Blip2Model``, or one
        saved by this class): its ViT, query tokens and Q-Former only."""
        meta = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
        if meta.get("model_type") != "blip-2":
            raise ValueError(f"{path}: the minigpt4 vision side loads from a transformers BLIP-2 folder "
                             f"(config.json model_type 'blip-2'), got model_type={meta.get('model_type')!r}")
        tower = qformer_tower_class().from_pretrained(path, dtype=dtype)
        tower.set_attn_implementation(attn)
        return tower

    def build_projector(self, config: ModelConfig, vision_tower: nn.Module, text_dim: int) -> nn.Module:
        return FusedLinearProjector(vision_tower.config.qformer_config.hidden_size, text_dim,
                                    bias=config.projector_bias, backend=config.projector_backend)

    def image_size(self, config: ModelConfig) -> int:
        return int(config.vision_config["vision_config"]["image_size"])

    def num_image_tokens(self, config: ModelConfig) -> int:
        return int(config.vision_config["num_query_tokens"])

    def encode(self, vision_tower: nn.Module, pixel_values: Tensor, config: ModelConfig) -> Tensor:
        return vision_tower(pixel_values)

    def vision_blocks(self, vision_tower: nn.Module, config: ModelConfig) -> tuple[list, int]:
        layers = list(vision_tower.vision_model.encoder.layers)
        return layers, len(layers)  # the ViT's last hidden state feeds the Q-Former: every block counts


ARCHS = {"llava": LlavaArch(), "minigpt4": MiniGPT4Arch()}


def get_arch(name: str):
    """The architecture called ``name``, or one clear error."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]
