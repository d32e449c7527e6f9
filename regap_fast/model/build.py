"""Building a ``VisionLanguageModel``: random weights from configs, or pretrained parts from folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .archs import get_arch
from .config import (TINY_LLAMA, ModelConfig, hf_config, plain_dict, prepare_tokenizer, read_preprocessor,
                     resolve_attn_implementation, tower_config)


def text_config_for(config: ModelConfig, tokenizer) -> dict:
    """The LM's config dict (the tiny default if none), its vocabulary large enough for the tokenizer and
    its special ids the tokenizer's."""
    text = dict(config.text_config or TINY_LLAMA)
    text["vocab_size"] = max(int(text.get("vocab_size") or 0), len(tokenizer))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return text


def build_from_config(cls, config: Optional[ModelConfig] = None, tokenizer=None, *, device=None,
                      dtype: Optional[torch.dtype] = None):
    """``cls.from_config``: random weights from configs (the tiny defaults where a config is None); with
    no tokenizer, the embedded default (a BPE trained offline on the synthetic captions)."""
    from transformers import AutoModelForCausalLM

    config = dataclasses.replace(config) if config is not None else ModelConfig()
    arch = get_arch(config.arch)
    if tokenizer is None:
        from ..data.synthetic import default_tokenizer

        tokenizer = default_tokenizer()
    prepare_tokenizer(tokenizer)
    config.vision_config = dict(config.vision_config or arch.tiny_vision_config)
    text = text_config_for(config, tokenizer)
    attn = resolve_attn_implementation(config.attn_implementation)
    tower = arch.build_vision(config, attn)
    lm = AutoModelForCausalLM.from_config(hf_config(text), attn_implementation=attn)
    config.vision_config, config.text_config = tower_config(tower), plain_dict(lm.config.to_dict())
    projector = arch.build_projector(config, tower, lm.config.hidden_size)
    return cls(config, tower, projector, lm, tokenizer).to(device=device, dtype=dtype).eval()


def build_from_parts(cls, vision_path: str, lm_path: str, *, config: Optional[ModelConfig] = None,
                     tokenizer_path: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None,
                     projector_weights: Optional[str] = None):
    """``cls.from_pretrained_parts``: a pretrained vision side and LM from local folders and a new
    projector (random init, or ``projector_weights``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for p in (vision_path, lm_path):
        if not Path(p).is_dir():
            raise FileNotFoundError(f"not a model folder: {p}")
    # absolute: a saved model that leaves these parts out must find them from anywhere
    config = dataclasses.replace(config or ModelConfig(), vision_path=str(Path(vision_path).resolve()),
                                 lm_path=str(Path(lm_path).resolve()))
    for k, v in read_preprocessor(vision_path).items():
        setattr(config, k, v)
    arch = get_arch(config.arch)
    attn = resolve_attn_implementation(config.attn_implementation)
    load_dtype = dtype or torch.float32  # transformers 5 would otherwise keep the checkpoint's dtype
    tower = arch.load_vision(str(vision_path), attn, load_dtype)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_path), attn_implementation=attn, dtype=load_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or lm_path))
    config.vision_config, config.text_config = tower_config(tower), plain_dict(lm.config.to_dict())
    projector = arch.build_projector(config, tower, lm.config.hidden_size).to(load_dtype)
    vlm = cls(config, tower, projector, lm, tokenizer)
    if projector_weights is not None:
        vlm.load_projector_weights(projector_weights)
    return vlm.to(device=device).eval()
