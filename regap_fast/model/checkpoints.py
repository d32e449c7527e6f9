"""Model files: writing a model (``save_model``), and reading another project's projector weights.
Loading a saved model is ``loading.py`` (it builds a ``VisionLanguageModel``; this module is below it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..projector import projector_state_dict
from .config import COMPONENTS, FORMAT


def is_peft(module: nn.Module) -> bool:
    """Whether ``module`` carries peft (LoRA) adapters."""
    return type(module).__module__.startswith("peft.")


def write_safetensors(tensors: dict, path: str | Path) -> None:
    """``safetensors.torch.save_file``, and the file mode every other output gets (0666 less the umask:
    usually 0644): safetensors writes its files 0600, through a private temporary file."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(vlm: nn.Module, save_dir: str | Path, components: Sequence[str] = COMPONENTS, *,
               state_dict: Optional[dict] = None) -> Path:
    """``vlm.save_pretrained``: config.json, model.safetensors (the weights of ``components``), tokenizer files."""
    save_dir = Path(save_dir)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    for name, path in (("vision_tower", vlm.config.vision_path), ("language_model", vlm.config.lm_path)):
        if name not in components and path is None:
            raise ValueError(f"{name} was built from a config, not loaded from a path: it must be saved")
    if is_peft(vlm.language_model):
        raise ValueError("the language model carries LoRA adapters: call vlm.merge_lora() before saving")
    tensors = _one_copy_each(vlm.state_dict() if state_dict is None else state_dict, components)
    save_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, save_dir / "model.safetensors")
    meta = {"format": FORMAT, "saved_components": list(components), **vlm.config.to_dict()}
    (save_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    vlm.tokenizer.save_pretrained(str(save_dir))
    return save_dir


def _one_copy_each(state: dict, components: Sequence[str]) -> dict:
    """The tensors of ``components``, one copy of tied weights (e.g. input and output embeddings: loading
    re-ties them), contiguous on the CPU."""
    tensors, seen = {}, set()
    for k in sorted(state):
        t = state[k]
        if k.split(".", 1)[0] in components and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[k] = t.detach().contiguous().cpu()
    return tensors


def read_projector_weights(path: str | Path) -> dict:
    """The projector tensors of another project's checkpoint (see ``VisionLanguageModel.load_projector_weights``),
    under this model's projector names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled objects other than tensors and containers
            raise ValueError(f"{path} could not be read as a plain checkpoint (weights_only=True): {exc}; "
                             "save its projector tensors with torch.save or safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # LAVIS / MiniGPT-4 checkpoints
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return projector_state_dict(state)
