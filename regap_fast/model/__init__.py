"""The LLaVA-style vision-language model every tool uses (docs/model-api.md).

    config.py       ModelConfig, the tiny defaults, transformers-config and tokenizer helpers
    archs.py        the architectures (llava: CLIP ViT + MLP; minigpt4: BLIP-2 ViT + Q-Former + linear)
    vlm.py          VisionLanguageModel: the LLaVA splice, the stage-1 loss with REGAP
    inference.py    its analysis (pair_embeddings) and generation
    build.py        building one: random weights from configs, or pretrained parts from folders
    checkpoints.py  writing one to disk; projector weights of other projects
    loading.py      loading a saved one (ours, transformers' LLaVA)

Every public name is importable from ``regap_fast.model``.
"""

from .archs import ARCHS, LlavaArch, MiniGPT4Arch, get_arch, qformer_tower_class
from .build import build_from_config, build_from_parts
from .checkpoints import read_projector_weights, save_model
from .config import (COMPONENTS, FORMAT, TINY_BLIP2, TINY_CLIP, TINY_LLAMA, ModelConfig, prepare_tokenizer,
                     resolve_attn_implementation)
from .loading import load_model
from .vlm import VisionLanguageModel

__all__ = [
    "ARCHS", "COMPONENTS", "FORMAT", "TINY_BLIP2", "TINY_CLIP", "TINY_LLAMA", "LlavaArch", "MiniGPT4Arch",
    "ModelConfig", "VisionLanguageModel", "build_from_config", "build_from_parts", "get_arch", "load_model",
    "prepare_tokenizer", "qformer_tower_class", "read_projector_weights", "resolve_attn_implementation",
    "save_model",
]
