"""REGAP on a transformers model that you train with your own script, ``Trainer`` or TRL.

    model = LlavaForConditionalGeneration.from_pretrained(...)
    regap_fast.apply_regap(model, regap_weight=0.1)
    out = model(**batch)          # out.loss = lm_loss + 0.1 * gap; out.regap_gap, out.lm_loss

``apply_regap`` patches one instance (other instances and the classes stay vanilla):

* the projector (``multi_modal_projector`` / ``language_projection``) becomes a ``FusedLlavaProjector``
  / ``FusedLinearProjector`` built around the *same* ``nn.Linear`` modules / parameters (same dtype,
  device, requires_grad, same state-dict keys), so ``save_pretrained`` writes a vanilla checkpoint;
* the instance's ``forward`` is wrapped: with ``labels``, ``pixel_values`` and a weight > 0 the
  projector also hands back its pooled output (no extra pass over the image tokens) and the loss
  gains ``regap_weight * gap``; otherwise the wrapped forward is called untouched (bitwise vanilla).

Caption tokens — the text side of the gap — are defined once, in ``caption_tokens``, as the library's
own data pipeline defines them (``regap_fast.data.llava.Encoder``: the answer's own text tokens at
the LLM input). From an HF batch that is: positions whose label is not ``-100``, minus image tokens
and special tokens (BOS, EOS, PAD and the image placeholder from the model's config, plus any
``special_token_ids`` you pass, e.g. ``tokenizer.all_special_ids`` or an end-of-turn separator that
your labels cover). A batch may instead carry ``caption_mask`` (bool, shaped like ``input_ids``),
which is used as given and never reaches the wrapped forward. The image side of a sample is the
mean over all its image tokens (several images per sample count together).
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..data.llava import IGNORE_INDEX
from ..ops import pooled_text_embeddings
from ..projector import FusedLinearProjector, FusedLlavaProjector
from ..reference import gap_from_means

# model class -> (kind of projector, where the projector may sit: transformers 5 nests LLaVA's
# under .model, 4.x kept it on the top-level module)
SUPPORTED = {
    "LlavaForConditionalGeneration": ("mlp2x_gelu", ("model.multi_modal_projector", "multi_modal_projector")),
    "Blip2ForConditionalGeneration": ("linear", ("language_projection", "model.language_projection")),
    "InstructBlipForConditionalGeneration": ("linear", ("language_projection", "model.language_projection")),
}
NOT_YET = {
    "LlavaNextForConditionalGeneration": "its image tokens are unpadded crops plus newline embeddings, so the "
                                         "projector's pooled output is not the mean of what the LLM sees",
    "LlavaOnevisionForConditionalGeneration": "same reason as LLaVA-NeXT (unpadded crops plus newline tokens)",
}


class RegapError(ValueError):
    """A model or batch that apply_regap cannot handle; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# the caption tokens: the one definition
# --------------------------------------------------------------------------------------------------


def caption_tokens(input_ids: Tensor, labels: Tensor, special_ids: Tensor) -> Tensor:
    """``[B, N]`` bool: the answer's text tokens (label != -100, not an image or special token)."""
    return (labels != IGNORE_INDEX) & ~torch.isin(input_ids, special_ids.to(input_ids.device))


def special_ids_of(model: nn.Module, extra: Iterable[int] = ()) -> list[int]:
    """BOS/EOS/PAD/image-token ids from the model's config (and text config, generation config)."""
    found = set(int(i) for i in extra)
    configs = [model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None)]
    for cfg in filter(None, configs):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "image_token_index"):
            value = getattr(cfg, name, None)
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(i, int) and i >= 0:
                    found.add(i)
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# the patched state
# --------------------------------------------------------------------------------------------------


@dataclass
class RegapState:
    """What apply_regap attached to a model (``model._regap``); also the running gap for logging."""

    weight: float
    squared: bool
    backend: str
    special_ids: Tensor
    image_token_id: int
    projector: nn.Module
    original_projector: nn.Module
    projector_path: str
    inner_forward: Optional[Callable]  # the function the patched forward wraps (unbound)
    last_regap_term: Optional[Tensor] = field(default=None, repr=False)  # for trainers that build their own loss
    gap_sum: Optional[Tensor] = field(default=None, repr=False)  # detached, since the last log
    gap_steps: int = 0

    def record(self, gap: Tensor) -> None:
        g = gap.detach().float()
        self.gap_sum = g if self.gap_sum is None else self.gap_sum + g
        self.gap_steps += 1

    def pop_mean(self) -> Optional[float]:
        """Mean gap of the forwards since the last call (averaged over ranks under torch.distributed)."""
        total = torch.tensor([0.0, 0.0]) if self.gap_sum is None else \
            torch.stack([self.gap_sum, self.gap_sum.new_tensor(float(self.gap_steps))])
        self.gap_sum, self.gap_steps = None, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            if torch.distributed.get_backend() == "nccl":
                total = total.cuda()
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else None


class _PooledCapture:
    """Projector mixin: while ``capture`` is a list, a plain call also appends (pooled output, tokens per
    image) to it, so that the model's own forward, run unchanged, hands REGAP the pooled image side."""

    capture: Optional[list] = None

    def forward(self, x: Tensor, image_mask: Optional[Tensor] = None, return_pooled: bool = False):
        if self.capture is None or return_pooled:
            return super().forward(x, image_mask, return_pooled)
        out, pooled = super().forward(x, image_mask, return_pooled=True)
        self.capture.append((pooled, x.shape[1]))
        return out


class _CapturingLlavaProjector(_PooledCapture, FusedLlavaProjector):
    pass


class _CapturingLinearProjector(_PooledCapture, FusedLinearProjector):
    pass


# --------------------------------------------------------------------------------------------------
# finding and swapping the projector
# --------------------------------------------------------------------------------------------------


def _model_kind(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    names = [c.__name__ for c in type(model).__mro__]
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
        if name in NOT_YET:
            raise RegapError(f"apply_regap does not support {name} yet: {NOT_YET[name]}")
    raise RegapError(f"apply_regap supports {', '.join(SUPPORTED)}; got {type(model).__name__}")


def _locate(model: nn.Module, paths: tuple[str, ...]) -> str:
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            continue
        if isinstance(getattr(parent, attr, None), nn.Module):
            return path
    raise RegapError(f"{type(model).__name__} has no projector at {' or '.join(paths)}")


def _fused_llava(old: nn.Module, config, backend: str) -> FusedLlavaProjector:
    """A FusedLlavaProjector around ``old``'s own linear layers (LLaVA-1.5's mlp2x_gelu only)."""
    children = dict(old.named_children())
    act = children.get("act")
    exact_gelu = (getattr(config, "projector_hidden_act", None) == "gelu"
                  and type(act).__name__ in ("GELUActivation", "GELU")
                  and getattr(act, "approximate", "none") == "none")
    l1, l2 = children.get("linear_1"), children.get("linear_2")
    if (set(children) != {"linear_1", "act", "linear_2"} or type(l1) is not nn.Linear or type(l2) is not nn.Linear
            or not exact_gelu or l1.out_features != l2.in_features or l2.in_features != l2.out_features
            or (l1.bias is None) != (l2.bias is None)):
        raise RegapError(f"unrecognised projector {type(old).__name__} (children {list(children)}, "
                         f"projector_hidden_act={getattr(config, 'projector_hidden_act', None)!r}): apply_regap "
                         "fuses LLaVA-1.5's Linear -> GELU (exact) -> Linear only")
    with torch.device("meta"):  # shell only: the real layers are moved in below
        fused = _CapturingLlavaProjector(l1.in_features, l1.out_features, bias=l1.bias is not None, backend=backend)
    fused.linear_1, fused.linear_2 = l1, l2
    return fused.train(old.training)


def _fused_linear(old: nn.Module, backend: str) -> FusedLinearProjector:
    """A FusedLinearProjector holding ``old``'s own weight and bias (BLIP-2's language_projection)."""
    if type(old) is not nn.Linear:
        raise RegapError(f"unrecognised projector {type(old).__name__}: apply_regap expects BLIP-2's "
                         "language_projection to be one nn.Linear")
    with torch.device("meta"):
        fused = _CapturingLinearProjector(old.in_features, old.out_features, bias=old.bias is not None,
                                          backend=backend)
    fused.weight, fused.bias = old.weight, old.bias
    return fused.train(old.training)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, module)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def apply_regap(model: nn.Module, regap_weight: float = 0.1, *, squared: bool = False, backend: str = "auto",
                special_token_ids: Iterable[int] = ()) -> nn.Module:
    """Add REGAP to ``model`` (in place; returned for chaining). See the module docstring.

    ``special_token_ids``: ids never counted as caption tokens, on top of the config's BOS/EOS/PAD
    and image token (pass ``tokenizer.all_special_ids`` for chat templates with extra markers).
    Applying again to a patched model updates the weight, ``squared``, backend and special ids.
    """
    if not isinstance(regap_weight, (int, float)) or regap_weight < 0:
        raise RegapError(f"regap_weight must be a number >= 0, got {regap_weight!r}")
    from ..backends import BACKENDS
    if backend not in BACKENDS:
        raise RegapError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    kind, paths = _model_kind(model)
    config = model.config
    if kind == "linear" and not getattr(config, "use_decoder_only_language_model", True):
        raise RegapError("apply_regap supports BLIP-2/InstructBLIP with a decoder-only language model (OPT, "
                         "LLaMA, Vicuna); this one is encoder-decoder (T5), whose captions are decoder labels")
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise RegapError(f"{type(model).__name__}'s config has no image_token_id: REGAP needs the image "
                         "placeholders in input_ids to tell which sample each image belongs to")
    specials = torch.tensor(special_ids_of(model, special_token_ids), dtype=torch.long)

    state: Optional[RegapState] = model.__dict__.get("_regap")
    if state is not None:  # already patched: new settings, same projector
        state.weight, state.squared, state.backend, state.special_ids = float(regap_weight), squared, backend, specials
        state.projector.backend = backend
        _wrap_outermost(model, state)
        return model

    path = _locate(model, paths)
    old = model.get_submodule(path)
    fused = _fused_llava(old, config, backend) if kind == "mlp2x_gelu" else _fused_linear(old, backend)
    _set(model, path, fused)
    model._regap = RegapState(float(regap_weight), squared, backend, specials, int(image_token_id), fused, old,
                              path, inner_forward=None)
    _wrap_outermost(model, model._regap)
    return model


def _wrap_outermost(model: nn.Module, state: RegapState) -> None:
    """Wrap the forward the instance runs today (the class's, or one patched onto the instance, e.g. by TRL
    or Liger), unless it is already ours. An inner REGAP wrapper left below steps aside (see forward)."""
    current = model.__dict__.get("forward")
    if getattr(current, "_regap_wrapper", False):
        return
    state.inner_forward = current.__func__ if isinstance(current, types.MethodType) else type(model).forward
    model.forward = types.MethodType(_wrap_forward(state.inner_forward), model)


def remove_regap(model: nn.Module) -> nn.Module:
    """Undo ``apply_regap``: the original projector module (with the current weights) and forward."""
    state: Optional[RegapState] = model.__dict__.pop("_regap", None)
    if state is None:
        raise RegapError("remove_regap: this model was not patched by apply_regap")
    old, fused = state.original_projector, state.projector
    if isinstance(fused, FusedLlavaProjector):
        old.linear_1, old.linear_2 = fused.linear_1, fused.linear_2
    else:
        old.weight, old.bias = fused.weight, fused.bias
    _set(model, state.projector_path, old.train(fused.training))
    if state.inner_forward is type(model).forward:
        del model.forward
    else:
        model.forward = types.MethodType(state.inner_forward, model)
    return model


def patched_module(model: nn.Module) -> Optional[nn.Module]:
    """The module apply_regap patched, looking through wrappers (DDP, FSDP, PEFT, torch.compile)."""
    for m in model.modules():
        if isinstance(m.__dict__.get("_regap"), RegapState):
            return m
    return None


def regap_state(model: nn.Module) -> Optional[RegapState]:
    """The RegapState of a patched model (or of a wrapper around one); None if not patched."""
    m = patched_module(model)
    return None if m is None else m._regap


# --------------------------------------------------------------------------------------------------
# the patched forward
# --------------------------------------------------------------------------------------------------


def _wrap_forward(inner: Callable) -> Callable:
    import inspect
    names = list(inspect.signature(inner).parameters)[1:]  # positional order after self

    @functools.wraps(inner)  # Trainer and TRL read the signature to keep batch columns
    def forward(self, *args, **kwargs):
        state: Optional[RegapState] = self.__dict__.get("_regap")
        if state is None:  # remove_regap ran while someone else's patch still calls us
            return inner(self, *args, **kwargs)
        given_caption = kwargs.pop("caption_mask", None)  # a batch may spell its caption tokens out
        named = dict(zip(names, args), **kwargs)
        labels, pixel_values = named.get("labels"), named.get("pixel_values")
        # an outer REGAP wrapper (applied again on top of someone else's patch) already collects this forward
        if labels is None or pixel_values is None or state.weight == 0 or state.projector.capture is not None:
            return inner(self, *args, **kwargs)
        input_ids = named.get("input_ids")
        if input_ids is None:
            raise RegapError("REGAP needs input_ids with the labels (to find the caption tokens); "
                             "this batch has inputs_embeds only")
        if labels.shape != input_ids.shape:
            raise RegapError(f"labels {tuple(labels.shape)} must align with input_ids {tuple(input_ids.shape)} "
                             "(one label per input token, -100 where there is no answer)")
        if named.get("image_sizes") is not None or named.get("mm_encoder_outputs") is not None:
            raise RegapError("REGAP needs the projector to run on whole images in this forward: "
                             "image_sizes (Pixtral-style) and precomputed mm_encoder_outputs are not supported")
        state.projector.capture = []
        try:
            out = inner(self, *args, **kwargs)
        finally:
            pooled, state.projector.capture = state.projector.capture, None
        if len(pooled) != 1:
            raise RegapError(f"the projector ran {len(pooled)} times in one forward; REGAP expects once")
        gap = _batch_gap(self, state, *pooled[0], input_ids, labels, given_caption)
        if self.training:
            state.record(gap)
        state.last_regap_term = state.weight * gap * _loss_share(labels, named.get("num_items_in_batch"))
        return _with_gap(out, gap, state.last_regap_term)

    forward._regap_wrapper = True
    return forward


def _loss_share(labels: Tensor, num_items_in_batch) -> Tensor | float:
    """This micro-batch's share of the step when the LM loss is a sum over ``num_items_in_batch`` tokens.

    The Trainer (gradient accumulation, token averaging across ranks) then sums the micro-batch losses
    instead of averaging them; weighting each gap by its share of the label tokens keeps lambda the
    weight of a (token-weighted) mean gap per optimizer step.
    """
    if num_items_in_batch is None:
        return 1.0
    local = (labels[:, 1:] != IGNORE_INDEX).sum()
    return local / torch.as_tensor(num_items_in_batch, device=local.device).clamp(min=1)


def _with_gap(out, gap: Tensor, regap_term: Tensor):
    if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
        return (out[0] + regap_term,) + out[1:]
    lm_loss = out.loss
    out["loss"] = lm_loss + regap_term
    out["lm_loss"] = lm_loss
    out["regap_gap"] = gap
    return out


def _batch_gap(model: nn.Module, state: RegapState, pooled_images: Tensor, tokens_per_image: int,
               input_ids: Tensor, labels: Tensor, given_caption: Optional[Tensor]) -> Tensor:
    """Mean over samples (with an image and a caption token) of ||mean image token - mean caption token||."""
    input_ids, labels = input_ids.to(pooled_images.device), labels.to(pooled_images.device)
    mu_image, has_image = _per_sample_image_means(pooled_images, input_ids == state.image_token_id,
                                                  tokens_per_image)
    if given_caption is None:
        caption = caption_tokens(input_ids, labels, state.special_ids)
    elif given_caption.dtype != torch.bool or given_caption.shape != input_ids.shape:
        raise RegapError(f"caption_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {given_caption.dtype} {tuple(given_caption.shape)}")
    else:
        caption = given_caption.to(input_ids.device)
    embed = model.get_input_embeddings().weight
    mu_text = pooled_text_embeddings(input_ids.to(embed.device), embed, caption.to(embed.device),
                                     backend=state.backend).to(mu_image.device)
    valid = has_image & caption.any(1)
    return gap_from_means(mu_image, mu_text.to(mu_image.dtype), valid, squared=state.squared)


def _per_sample_image_means(pooled: Tensor, image_mask: Tensor, tokens_per_image: int):
    """[num_images, D] image means -> [B, D] sample means (images in order; equal tokens each), has_image."""
    per_sample = image_mask.sum(1)
    images = per_sample // tokens_per_image
    # one host sync per step for the check; repeat_interleave is told its size, so it adds none
    if bool((per_sample % tokens_per_image).any() | (images.sum() != pooled.shape[0])):
        raise RegapError(f"{pooled.shape[0]} images of {tokens_per_image} tokens each, but the samples hold "
                         f"{per_sample.tolist()} image tokens: cannot tell which sample each image belongs to")
    owner = torch.repeat_interleave(torch.arange(len(images), device=pooled.device), images.to(pooled.device),
                                    output_size=pooled.shape[0])
    sums = pooled.new_zeros(len(images), pooled.shape[1]).index_add(0, owner, pooled)
    return sums / images.clamp(min=1).to(sums).unsqueeze(1), images > 0


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------


class RegapCallback(TrainerCallback):
    """Puts ``regap_gap`` (the mean gap of the training forwards since the last log) into the Trainer's logs.

    The Trainer calls callbacks in order and its reporters (TensorBoard, wandb, ...) come first, so add
    this one with ``RegapCallback.attach(trainer)``, which puts it in front of them.
    """

    _warned = False

    @classmethod
    def attach(cls, trainer) -> "RegapCallback":
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:  # training logs only
            return
        regap = regap_state(model)
        value = None if regap is None else regap.pop_mean()
        if value is None:
            if regap is not None and regap.weight > 0 and not self._warned:
                self._warned = True
                warnings.warn("RegapCallback: no REGAP term was computed since the last log (batches without labels "
                              "or images? TRL's SFTTrainer needs regap_fast.integrations.trl.RegapSFTTrainer)")
            return
        logs["regap_gap"] = value
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last["regap_gap"] = value  # the Trainer copied logs into its history before calling us
