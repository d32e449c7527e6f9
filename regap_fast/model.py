"""The LLaVA-style vision-language model every tool uses (docs/model-api.md).

    pixels -> vision tower (features of one layer) -> projector -> image tokens
    text   -> token ids, the image placeholder expanded to ``num_image_tokens`` slots
    the image tokens are written into their slots of the LM's input embeddings (the LLaVA splice)
    -> causal LM; the loss on answer (caption) tokens only; REGAP on the projector outputs

The vision side and the projector come from a small per-architecture class (``ARCHS``):

    llava     CLIP ViT (features of one layer, CLS dropped) -> FusedLlavaProjector (Linear-GELU-Linear)
    minigpt4  BLIP-2 ViT -> Q-Former (learned query tokens) -> FusedLinearProjector (MiniGPT-4's
              ``llama_proj``), the image tokens wrapped ``<Img>`` ... ``</Img>`` in the prompt
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.llava import (CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_PLACEHOLDER, VICUNA_CHAT_TEMPLATE, Collator,
                         Encoder, ImageTransform)
from .projector import FusedLinearProjector, FusedLlavaProjector, projector_gap_loss, projector_state_dict

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


def _hf_config(d: dict):
    """A transformers config object from its dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    d = dict(d)
    if "model_type" not in d:
        raise ValueError("a transformers config dict needs its 'model_type'")
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _plain(d: dict) -> dict:
    """As it will read back from config.json (e.g. integer keys become strings), so a loaded config
    compares equal to the saved one."""
    return json.loads(json.dumps(d, default=str))


def _tower_config(tower: nn.Module) -> dict:
    """The vision side's transformers config as a plain dict (a BLIP-2 config without its unused LM part)."""
    d = _plain(tower.config.to_dict())
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


def _read_preprocessor(path: Optional[str]) -> dict:
    """image_mean/std from a checkpoint folder's preprocessor_config.json, when it has one."""
    if path is None or not (Path(path) / "preprocessor_config.json").is_file():
        return {}
    pc = json.loads((Path(path) / "preprocessor_config.json").read_text())
    return {k: tuple(pc[k]) for k in ("image_mean", "image_std") if k in pc}


def prepare_tokenizer(tokenizer):
    """A pad token (LLaVA uses unk; else eos) and a chat template (Vicuna v1, LLaVA-1.5's) if missing."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------
# architectures: the vision side and the projector
# --------------------------------------------------------------------------------------------------


class LlavaArch:
    """LLaVA-1.5: a CLIP ViT, the features of one layer (CLS dropped), a 2-layer GELU MLP projector."""

    name = "llava"
    tiny_vision_config = TINY_CLIP
    image_wrap = ("", "")  # text around the image tokens in the prompt
    image_resize = "crop"  # CLIP's preprocessing: shortest side to the size, centre crop

    def build_vision(self, config: ModelConfig, attn: str) -> nn.Module:
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel(_hf_config(config.vision_config))
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

    def build_vision(self, config: ModelConfig, attn: str) -> nn.Module:
        tower = qformer_tower_class()(_hf_config(config.vision_config))
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


def _arch(name: str):
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


class VisionLanguageModel(nn.Module):
    """Vision tower + projector + causal LM + tokenizer, with the LLaVA splice and the REGAP loss."""

    def __init__(self, config: ModelConfig, vision_tower: nn.Module, projector: nn.Module,
                 language_model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.arch = _arch(config.arch)
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.image_transform = ImageTransform(self.image_size, tuple(config.image_mean), tuple(config.image_std),
                                              resize=self.arch.image_resize)
        vocab = self.language_model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the LM's embedding only {vocab}")

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Optional[ModelConfig] = None, tokenizer=None, *, device=None,
                    dtype: Optional[torch.dtype] = None) -> "VisionLanguageModel":
        """Random weights from configs (the tiny defaults where a config is None); with no tokenizer,
        the embedded default (a BPE trained offline on the synthetic captions)."""
        config = dataclasses.replace(config) if config is not None else ModelConfig()
        arch = _arch(config.arch)
        if tokenizer is None:
            from .data.synthetic import default_tokenizer

            tokenizer = default_tokenizer()
        prepare_tokenizer(tokenizer)
        config.vision_config = dict(config.vision_config or arch.tiny_vision_config)
        text = dict(config.text_config or TINY_LLAMA)
        text["vocab_size"] = max(int(text.get("vocab_size") or 0), len(tokenizer))
        text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        attn = resolve_attn_implementation(config.attn_implementation)
        from transformers import AutoModelForCausalLM

        tower = arch.build_vision(config, attn)
        lm = AutoModelForCausalLM.from_config(_hf_config(text), attn_implementation=attn)
        config.vision_config, config.text_config = _tower_config(tower), _plain(lm.config.to_dict())
        projector = arch.build_projector(config, tower, lm.config.hidden_size)
        return cls(config, tower, projector, lm, tokenizer).to(device=device, dtype=dtype).eval()

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for p in (vision_path, lm_path):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"not a model folder: {p}")
        # absolute: a saved model that leaves these parts out must find them from anywhere
        config = dataclasses.replace(config or ModelConfig(), vision_path=str(Path(vision_path).resolve()),
                                     lm_path=str(Path(lm_path).resolve()))
        for k, v in _read_preprocessor(vision_path).items():
            setattr(config, k, v)
        arch = _arch(config.arch)
        attn = resolve_attn_implementation(config.attn_implementation)
        load_dtype = dtype or torch.float32  # transformers 5 would otherwise keep the checkpoint's dtype
        tower = arch.load_vision(str(vision_path), attn, load_dtype)
        lm = AutoModelForCausalLM.from_pretrained(str(lm_path), attn_implementation=attn, dtype=load_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or lm_path))
        config.vision_config, config.text_config = _tower_config(tower), _plain(lm.config.to_dict())
        projector = arch.build_projector(config, tower, lm.config.hidden_size).to(load_dtype)
        vlm = cls(config, tower, projector, lm, tokenizer)
        if projector_weights is not None:
            vlm.load_projector_weights(projector_weights)
        return vlm.to(device=device).eval()

    def save_pretrained(self, save_dir: str | Path, components: Sequence[str] = COMPONENTS, *,
                        state_dict: Optional[dict] = None) -> Path:
        """config.json, model.safetensors (the weights of ``components``), tokenizer files.

        Leaving out a component loaded from a path (e.g. a frozen 7B LM after stage 1) saves only what
        changed; ``load_model`` then reads that component from its recorded path. ``state_dict`` (full
        names, e.g. gathered from FSDP shards) replaces the module's own tensors.
        """
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
        for name, path in (("vision_tower", self.config.vision_path), ("language_model", self.config.lm_path)):
            if name not in components and path is None:
                raise ValueError(f"{name} was built from a config, not loaded from a path: it must be saved")
        if _is_peft(self.language_model):
            raise ValueError("the language model carries LoRA adapters: call vlm.merge_lora() before saving")
        state = self.state_dict() if state_dict is None else state_dict
        tensors, seen = {}, set()
        for k in sorted(state):
            t = state[k]
            # one copy of tied weights (e.g. input and output embeddings); loading re-ties them
            if k.split(".", 1)[0] in components and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors[k] = t.detach().contiguous().cpu()
        save_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(save_dir / "model.safetensors"))
        meta = {"format": FORMAT, "saved_components": list(components), **self.config.to_dict()}
        (save_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        self.tokenizer.save_pretrained(str(save_dir))
        return save_dir

    def set_attn_implementation(self, requested: str = "auto") -> str:
        """Switch the vision tower's and the LM's attention kernels ('auto': see resolve_attn_implementation)."""
        impl = resolve_attn_implementation(requested)
        for m in (self.vision_tower, self.language_model):
            m.set_attn_implementation(impl)
        self.config.attn_implementation = impl
        return impl

    def merge_lora(self) -> "VisionLanguageModel":
        """Fold LoRA adapters (peft) into the LM's weights, leaving a plain transformers model."""
        if _is_peft(self.language_model):
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
        return Encoder(self.tokenizer, self.num_image_tokens, fmt, max_length, image_wrap=self.image_wrap)

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
        weights = projector_state_dict(state)
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

    def _splice(self, inputs_embeds: Tensor, image_embeds: Tensor, image_positions: Tensor) -> Tensor:
        """Write the image tokens (in order, image by image) into their slots of the input embeddings."""
        per_sample = image_positions.sum(1).tolist()
        n = self.num_image_tokens
        if any(c not in (0, n) for c in per_sample) or sum(per_sample) != image_embeds.shape[0] * n:
            raise ValueError(f"image_positions must mark {n} slots in each sample with an image "
                             f"({image_embeds.shape[0]} images), got {per_sample}")
        return inputs_embeds.masked_scatter(image_positions.unsqueeze(-1),
                                            image_embeds.to(inputs_embeds.dtype))

    # -- training forward -------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None,
                image_positions: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                caption_positions: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                regap_weight: float = 0.0, compute_gap: bool = False, regap_squared: bool = False,
                full_logits: bool = False, output_hidden_states: bool = False) -> dict:
        """The loss of a batch (the Collator's tensors).

        Returns a dict: ``loss`` (= lm_loss + regap_weight * gap), ``lm_loss`` (mean over label
        tokens), ``gap`` (mean over samples with image and caption; None unless ``regap_weight > 0``
        or ``compute_gap``) and the sums and counts behind them (``lm_loss_sum``, ``num_tokens``,
        ``gap_sum``, ``num_gap_samples``) so that a trainer can normalise over a global batch;
        ``logits`` (at the label positions only unless ``full_logits``), ``hidden_states``.

        With right padding and a causal LM the attention mask changes nothing at the positions that
        carry a label, so passing none lets SDPA run its flash kernel.
        """
        embed = self.language_model.get_input_embeddings()
        input_ids = input_ids.to(embed.weight.device)
        inputs_embeds = embed(input_ids)
        want_gap = regap_weight > 0 or compute_gap
        gap_sum = num_gap = None
        if pixel_values is not None:
            if image_positions is None:
                raise ValueError("pixel_values given without image_positions")
            image_positions = image_positions.to(input_ids.device)
            feats = self.encode_images(pixel_values)
            if want_gap:  # lambda = 0 never gets here: REGAP costs nothing when off
                if caption_positions is None:
                    raise ValueError("REGAP needs caption_positions")
                has_image = image_positions.any(1)
                caption = caption_positions.to(input_ids.device)[has_image]
                image_embeds, gap_sum = projector_gap_loss(
                    self.projector, feats, input_ids[has_image], embed.weight, None, caption,
                    squared=regap_squared, reduction="sum")
                num_gap = caption.any(1).sum()
            else:
                image_embeds = self.projector(feats)
            inputs_embeds = self._splice(inputs_embeds, image_embeds, image_positions)

        keep = 0  # all positions
        if labels is not None:
            labels = labels.to(input_ids.device)
            if not full_logits:  # the LM head only where a label follows (stage 1: the caption, not 576 image slots)
                keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False,
                                  output_hidden_states=output_hidden_states, logits_to_keep=keep)
        result = {"logits": out.logits, "hidden_states": out.hidden_states if output_hidden_states else None,
                  "gap_sum": gap_sum, "num_gap_samples": num_gap, "gap": None}
        if gap_sum is not None:
            result["gap"] = gap_sum / num_gap.clamp(min=1)
        if labels is None:
            return result
        target = labels[:, 1:] if isinstance(keep, int) else labels[:, keep + 1]
        logits = out.logits[:, :-1] if isinstance(keep, int) else out.logits
        lm_sum = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        n_tok = (target != IGNORE_INDEX).sum()
        if pixel_values is None and torch.is_grad_enabled():
            # a batch without images (text-only records of stage-2 data) still gives the projector (and any
            # trained vision block) a (zero) gradient: DDP and FSDP expect one for every trained parameter
            trained = [p for m in (self.projector, self.vision_tower) for p in m.parameters() if p.requires_grad]
            if trained:
                lm_sum = lm_sum + 0.0 * sum(p.sum() for p in trained)
        result.update(lm_loss_sum=lm_sum, num_tokens=n_tok, lm_loss=lm_sum / n_tok.clamp(min=1))
        result["loss"] = result["lm_loss"] + (regap_weight * result["gap"] if regap_weight > 0 else 0)
        return result

    # -- analysis and generation ------------------------------------------------------------------

    def _batch(self, examples: list[dict], padding_side: str = "right") -> dict:
        return Collator(self.tokenizer.pad_token_id, padding_side)(examples)

    @torch.no_grad()
    def pair_embeddings(self, images: Sequence, captions: Sequence[str], *, output_hidden_states: bool = False) -> dict:
        """Image tokens then the caption (the stage-1 input) through the model; see docs/model-api.md."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        enc = self.encoder("plain")
        examples = [dict(enc.encode([{"from": "gpt", "value": c}], has_image=True),
                         pixel_values=self.image_transform(im)) for im, c in zip(images, captions)]
        b = self._batch(examples)
        dev = self.device
        input_ids, image_pos, caption_pos = (b[k].to(dev)
                                             for k in ("input_ids", "image_positions", "caption_positions"))
        image_embeds = self.projector(self.encode_images(b["pixel_values"]))
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        # caption tokens gathered to the front of each row (a stable sort keeps their order), then padded
        nt = int(caption_pos.sum(1).max())
        order = torch.argsort((~caption_pos).to(torch.int8), dim=1, stable=True)[:, :nt]
        text_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        text_mask = torch.arange(nt, device=dev) < caption_pos.sum(1, keepdim=True)
        out = {"image_embeds": image_embeds, "text_embeds": text_embeds,
               "image_mask": torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=dev), "text_mask": text_mask,
               "image_positions": image_pos, "caption_positions": caption_pos}
        if output_hidden_states:
            spliced = self._splice(inputs_embeds, image_embeds, image_pos)
            lm_out = self.language_model(inputs_embeds=spliced, use_cache=False, output_hidden_states=True,
                                         logits_to_keep=1)
            out["hidden_states"] = lm_out.hidden_states
        return out

    def chat_prompt(self, user_text: str, has_image: bool) -> str:
        """The chat template applied to one user turn, ``<image>`` where the image goes."""
        content = f"{IMAGE_PLACEHOLDER}\n{user_text}" if has_image else user_text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, batch_size: int = 8) -> list[str]:
        """Answers to raw user requests (each with an image or None), batched with left padding."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        enc = self.encoder("chat")
        dev = self.device
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            examples = []
            for text, im in zip(prompts[start:start + batch_size], images[start:start + batch_size]):
                # a literal placeholder typed by a user is text, not a request for an image
                prompt = self.chat_prompt(text.replace(IMAGE_PLACEHOLDER, "<image >"), im is not None)
                examples.append(dict(enc.encode_prompt(prompt),
                                     pixel_values=None if im is None else self.image_transform(im)))
            b = self._batch(examples, padding_side="left")
            input_ids, image_pos = b["input_ids"].to(dev), b["image_positions"].to(dev)
            embeds = self.language_model.get_input_embeddings()(input_ids)
            if b["pixel_values"] is not None:
                embeds = self._splice(embeds, self.projector(self.encode_images(b["pixel_values"])), image_pos)
            sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            out = self.language_model.generate(
                inputs_embeds=embeds, attention_mask=b["attention_mask"].to(dev), max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **sampling)
            answers += [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return answers


def _is_peft(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


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
    raise ValueError(f"{path} holds neither a regap_fast model (config.json 'format': {FORMAT!r}) nor a "
                     f"transformers LlavaForConditionalGeneration (model_type 'llava'); got "
                     f"model_type={meta.get('model_type')!r}")


def _load_ours(path: Path, meta: dict, device, dtype) -> VisionLanguageModel:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = meta.pop("saved_components")
    meta.pop("format")
    config = ModelConfig.from_dict(meta)
    arch = _arch(config.arch)
    attn = resolve_attn_implementation(config.attn_implementation)
    if "vision_tower" in saved:
        tower = arch.build_vision(config, attn)
    else:
        tower = arch.load_vision(config.vision_path, attn, dtype)
    if "language_model" in saved:
        lm = AutoModelForCausalLM.from_config(_hf_config(config.text_config), attn_implementation=attn)
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
                         projector_bias=meta.get("multimodal_projector_bias", True), **_read_preprocessor(str(path)))
    attn = resolve_attn_implementation(config.attn_implementation)
    llava = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    if llava.config.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"only CLIP vision towers are supported, got {llava.config.vision_config.model_type!r}")
    tower = llava.model.vision_tower
    config.vision_config = _plain(tower.config.to_dict())
    config.text_config = _plain(llava.config.text_config.to_dict())
    projector = _arch("llava").build_projector(config, tower, llava.config.text_config.hidden_size)
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
