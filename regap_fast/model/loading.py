"""Loading a saved model: ours (``save_pretrained``), a training run's folder, transformers' LLaVA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .archs import get_arch
from .config import FORMAT, ModelConfig, hf_config, plain_dict, read_preprocessor, resolve_attn_implementation
from .vlm import VisionLanguageModel


def _default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(path: str | Path, device="cpu", dtype: Optional[torch.dtype] = None) -> VisionLanguageModel:
    """A model saved by ``save_pretrained``, a run folder of ``regap-fast train``/``demo`` (its ``model/``),
    or a transformers ``LlavaForConditionalGeneration`` folder.

    ``dtype`` None: bf16 on CUDA, fp32 on the CPU.
    """
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a training run's folder: its exported model
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        hint = (" (a training checkpoint holds weights for --resume; the model to load is the run's model/ folder, "
                "written when the run finishes)" if (path / "train_state.pt").is_file()
                or path.parent.name == "checkpoints" else "")
        raise FileNotFoundError(f"{path} is not a model folder (no config.json){hint}")
    meta = json.loads(cfg_path.read_text())
    dtype = dtype or _default_dtype(device)
    if meta.get("format") == FORMAT:
        return _load_ours(path, meta, device, dtype)
    if meta.get("model_type") == "llava":
        return _load_llava_hf(path, meta, device, dtype)
    raise ValueError(unreadable_folder_message(path, meta))


def unreadable_folder_message(path: Path, meta: dict) -> str:
    """Why ``load_model`` cannot read a folder, naming what is there and what would read it."""
    kind = meta.get("model_type")
    if kind is None:
        return (f"{path} holds neither a regap_fast model (config.json 'format': {FORMAT!r}) nor a transformers "
                "model (config.json has no 'model_type')")
    has_processor = any((path / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    return (f"{path} holds a transformers {kind!r} model: this command reads regap_fast models and transformers "
            f"LLaVA-1.5 folders (model_type 'llava') only; `regap-fast gap` reads every family of "
            f"docs/integrations.md" + ("" if has_processor else
                                        " from a folder that also holds its processor (processor.save_pretrained"
                                        "(DIR) writes preprocessor_config.json), which this one lacks"))


def _load_ours(path: Path, meta: dict, device, dtype) -> VisionLanguageModel:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = meta.pop("saved_components")
    meta.pop("format")
    config = ModelConfig.from_dict(meta)
    arch = get_arch(config.arch)
    attn = resolve_attn_implementation(config.attn_implementation)
    if "vision_tower" in saved:
        tower = arch.build_vision(config, attn)
    else:
        tower = arch.load_vision(config.vision_path, attn, dtype)
    if "language_model" in saved:
        lm = AutoModelForCausalLM.from_config(hf_config(config.text_config), attn_implementation=attn)
    else:
        lm = AutoModelForCausalLM.from_pretrained(config.lm_path, attn_implementation=attn, dtype=dtype)
    projector = arch.build_projector(config, tower, lm.config.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    vlm = VisionLanguageModel(config, tower, projector, lm, tokenizer)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    own = vlm.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    # missing is fine only for parts not saved, and for aliases of a loaded tensor (tied weights)
    missing = [k for k in missing if k.split(".", 1)[0] in saved and own[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{path / 'model.safetensors'} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return vlm.to(device=device, dtype=dtype).eval()


def _load_llava_hf(path: Path, meta: dict, device, dtype) -> VisionLanguageModel:
    """Take a transformers LLaVA apart: its modules are reused as they are (no copy of the LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    if meta.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"only LLaVA's GELU projector is supported, got {meta['projector_hidden_act']!r}")
    if not isinstance(meta.get("vision_feature_layer", -2), int):
        raise ValueError("LLaVA checkpoints that concatenate several vision layers are not supported")
    config = ModelConfig(vision_feature_layer=meta.get("vision_feature_layer", -2),
                         vision_feature_select=meta.get("vision_feature_select_strategy", "default"),
                         projector_bias=meta.get("multimodal_projector_bias", True), **read_preprocessor(str(path)))
    attn = resolve_attn_implementation(config.attn_implementation)
    llava = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    if llava.config.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"only CLIP vision towers are supported, got {llava.config.vision_config.model_type!r}")
    tower = llava.model.vision_tower
    config.vision_config = plain_dict(tower.config.to_dict())
    config.text_config = plain_dict(llava.config.text_config.to_dict())
    projector = get_arch("llava").build_projector(config, tower, llava.config.text_config.hidden_size)
    projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
    with torch.device("meta"):  # the causal-LM shell only; its body and head are LLaVA's own modules
        lm = AutoModelForCausalLM.from_config(llava.config.text_config, attn_implementation=attn)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.set_output_embeddings(llava.lm_head)
    left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"could not take the LM out of the LLaVA model; unset: {left[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    vlm = VisionLanguageModel(config, tower, projector, lm, tokenizer)
    return vlm.to(device=device, dtype=dtype).eval()
