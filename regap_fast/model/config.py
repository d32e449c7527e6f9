"""What a ``VisionLanguageModel`` is made of, as data: its config, the tiny defaults, and the small
helpers that turn transformers configs, checkpoint folders and tokenizers into what the model needs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data.llava import CLIP_MEAN, CLIP_STD, VICUNA_CHAT_TEMPLATE

log = logging.getLogger(__name__)

FORMAT = "regap_fast.VisionLanguageModel"
COMPONENTS = ("vision_tower", "projector", "language_model")

# The embedded default: small enough to train in a minute on two CPU cores.
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, image_size=64, patch_size=16, projection_dim=64)
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False)
# MiniGPT-4's vision side in miniature: a BLIP-2 ViT (4 blocks) and a Q-Former (2 layers, cross-attention in
# each; the real one: 12 layers, hidden 768, cross-attention every 2nd) with MiniGPT-4's 32 query tokens
TINY_BLIP2 = dict(model_type="blip-2", num_query_tokens=32,
                  vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     image_size=64, patch_size=16),
                  qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, cross_attention_frequency=1, encoder_hidden_size=64))


@dataclass
class ModelConfig:
    """Everything needed to rebuild a ``VisionLanguageModel`` (JSON-serialisable)."""

    arch: str = "llava"
    vision_config: Optional[dict] = None  # transformers config dict of the vision tower; None: tiny default
    text_config: Optional[dict] = None  # transformers config dict of the causal LM; None: tiny default
    vision_path: Optional[str] = None  # where the vision tower's weights come from if not saved with the model
    lm_path: Optional[str] = None  # likewise for the LM (and its tokenizer)
    vision_feature_layer: int = -2  # LLaVA-1.5: the penultimate layer
    vision_feature_select: str = "default"  # "default": drop the CLS token; "full": keep it
    projector_bias: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    image_aspect_ratio: str = "keep"  # "pad": expand to a square with the mean colour first (LLaVA-1.5's
    #                                   --image_aspect_ratio pad); "keep": the arch's resize as it is
    attn_implementation: str = "auto"  # auto: flash_attention_2 if flash-attn imports (CUDA), else sdpa
    projector_backend: str = "auto"  # REGAP kernels: auto, torch, triton, cuda
    image_wrap: Optional[tuple] = None  # text before and after the image tokens; None: the arch's (minigpt4:
    #                                     "<Img>", "</Img>"; MiniGPT-4's own stage-1 script used none: ("", ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            log.warning("ignoring unknown model config keys %s (written by a newer regap_fast?)", unknown)
        d = {k: (tuple(v) if k in ("image_mean", "image_std", "image_wrap") and v is not None else v)
             for k, v in d.items() if k in known}
        return cls(**d)


def hf_config(d: dict):
    """A transformers config object from its dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    d = dict(d)
    if "model_type" not in d:
        raise ValueError("a transformers config dict needs its 'model_type'")
    return AutoConfig.for_model(d.pop("model_type"), **d)


def plain_dict(d: dict) -> dict:
    """As it will read back from config.json (e.g. integer keys become strings), so a loaded config
    compares equal to the saved one."""
    return json.loads(json.dumps(d, default=str))


def tower_config(tower: nn.Module) -> dict:
    """The vision side's transformers config as a plain dict (a BLIP-2 config without its unused LM part)."""
    d = plain_dict(tower.config.to_dict())
    if d.get("model_type") == "blip-2":
        d.pop("text_config", None)
    return d


def resolve_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when the flash-attn package is installed and a GPU is there, else PyTorch SDPA
    (which runs its own FlashAttention kernel on CUDA in bf16/fp16 when no mask is passed)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def read_preprocessor(path: Optional[str]) -> dict:
    """ModelConfig fields from a checkpoint folder's preprocessor_config.json, when it has one:
    image_mean/std, and pad mode from transformers' LLaVA processor (``do_pad``: LLaVA-1.5's padding)."""
    if path is None or not (Path(path) / "preprocessor_config.json").is_file():
        return {}
    pc = json.loads((Path(path) / "preprocessor_config.json").read_text())
    fields = {k: tuple(pc[k]) for k in ("image_mean", "image_std") if k in pc}
    if pc.get("do_pad"):
        fields["image_aspect_ratio"] = "pad"
    return fields


def prepare_tokenizer(tokenizer):
    """A pad token (LLaVA uses unk; else eos) and a chat template (Vicuna v1, LLaVA-1.5's) if missing."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    return tokenizer
