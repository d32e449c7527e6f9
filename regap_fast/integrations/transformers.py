"""REGAP on a transformers vision-language model that you train with your own script, ``Trainer`` or TRL.

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(...)
    regap_fast.apply_regap(model, regap_weight=0.1)
    out = model(**batch)          # out.loss = lm_loss + 0.1 * gap; out.regap_gap, out.lm_loss

Any ``*ForConditionalGeneration`` that writes its image features into the text embeddings at image
placeholder tokens (config ``image_token_id`` / ``image_token_index``) is covered; docs/integrations.md
lists the families tested. The gap is taken where the paper defines it, at the language model's input:

* the image side is the ``inputs_embeds`` the language model receives, at the image placeholders (and
  the video placeholders, unless ``include_video=False``): unpadded crops, newline tokens, pixel-shuffle
  connectors and scaled embeddings count as the LLM sees them. A forward pre-hook on the language
  model reads them; it is installed only for a forward that computes REGAP.
* the caption side is the same tensor at the caption tokens: ``regap_fast.core.caption_mask`` (label
  != -100, not an image, video or special token: every token id the config names, plus
  ``special_token_ids``). A batch may carry ``caption_mask`` (bool, shaped like ``input_ids``) instead;
  it is used as given and never reaches the wrapped forward.

LLaVA-1.5, BLIP-2 and InstructBLIP (decoder-only LM with a plain embedding table) get the fast path
(``fuse_projector``): the projector becomes a ``FusedLlavaProjector`` / ``FusedLinearProjector`` built
around the *same* ``nn.Linear`` modules (same parameters and state-dict keys, so ``save_pretrained``
writes a vanilla checkpoint), which hands REGAP the pooled image side from its GEMM epilogue; the
caption side is pooled from the token ids. Same loss and gradients as the generic path.

Only the patched instance changes. A forward without labels, without images or with weight 0 calls the
wrapped forward untouched (bitwise vanilla).
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..constants import IGNORE_INDEX
from ..core import RegapError, caption_mask, check_labels, gap_samples, modality_gap
from ..gap_layer import SCALES, LayerOutput, TextNormScale, check_layer
from ..projector import FusedLinearProjector, FusedLlavaProjector

# the fast path: model class -> (kind of projector, where it may sit: transformers 5 nests LLaVA's under .model)
FUSABLE = {
    "LlavaForConditionalGeneration": ("mlp2x_gelu", ("model.multi_modal_projector", "multi_modal_projector")),
    "Blip2ForConditionalGeneration": ("linear", ("language_projection", "model.language_projection")),
    "InstructBlipForConditionalGeneration": ("linear", ("language_projection", "model.language_projection")),
}
TOKEN_ID_NAMES = ("_token_id", "_token_index", "_token_ids")  # config entries that hold token ids


# --------------------------------------------------------------------------------------------------
# what a model must be
# --------------------------------------------------------------------------------------------------


def check_supported(model: nn.Module) -> None:
    """One RegapError saying why, for a model whose LLM input has no continuous image tokens to find."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_image_features", None)):
        raise RegapError(f"apply_regap needs a transformers vision-language model (a *ForConditionalGeneration with "
                         f"get_image_features); got {name}")
    if hasattr(model, "vqmodel") or hasattr(model.base_model, "vqmodel"):
        raise RegapError(f"{name} is not supported: its images enter the LLM as discrete VQ token ids of the text "
                         "vocabulary, so there is no image embedding for REGAP to pull toward the captions")
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "use_decoder_only_language_model", True):
        raise RegapError(f"{name} has an encoder-decoder language model (e.g. T5), whose captions are decoder labels, "
                         "not tokens beside the image tokens at the LLM input: use a decoder-only LM (OPT, LLaMA, ...)")
    if _config_id(config, "image_token_id", "image_token_index") is None:
        raise RegapError(f"{name}'s config has no image_token_id: REGAP finds the image tokens at their placeholders")
    decoder = _decoder(model)
    if "inputs_embeds" not in inspect.signature(decoder.forward).parameters:
        raise RegapError(f"cannot find {name}'s language model (get_decoder() gives {type(decoder).__name__}, "
                         "which takes no inputs_embeds)")


def _config_id(config, *names: str) -> Optional[int]:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int):
            return value
    return None


def _decoder(model: nn.Module) -> nn.Module:
    """The text transformer whose ``inputs_embeds`` are the LLM's input: ``get_decoder()`` down to the innermost."""
    module = model
    while callable(getattr(module, "get_decoder", None)):
        inner = module.get_decoder()
        if inner is None or inner is module:
            break
        module = inner
    return module


def placeholder_ids(model: nn.Module, include_video: bool = True) -> list[int]:
    """The ids of the image placeholders (and the video placeholders) in the model's input_ids."""
    ids = [_config_id(model.config, "image_token_id", "image_token_index")]
    if include_video:
        ids.append(_config_id(model.config, "video_token_id", "video_token_index"))
    return [i for i in ids if i is not None]


def special_ids_of(model: nn.Module, extra: Iterable[int] = ()) -> list[int]:
    """Every token id the model's config, text config and generation config name (BOS, EOS, PAD, image and
    video placeholders, image start/end markers, ...), plus ``extra``: never caption tokens."""
    found = set(int(i) for i in extra)
    configs = [model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None)]
    for cfg in filter(None, configs):
        for name, value in vars(cfg).items():
            if name.endswith(TOKEN_ID_NAMES):
                found.update(i for i in (value if isinstance(value, (list, tuple)) else [value])
                             if isinstance(i, int) and i >= 0)
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
    image_ids: Tensor  # the placeholders whose embeddings are the image side
    include_video: bool
    inner_forward: Optional[Callable] = None  # the function the patched forward wraps (unbound)
    fused: Optional[nn.Module] = None  # the fast path's projector, when it applies
    original_projector: Optional[nn.Module] = None
    projector_path: str = ""
    capturing: bool = False  # a REGAP forward is running (an outer wrapper on top steps aside)
    last_regap_term: Optional[Tensor] = field(default=None, repr=False)  # for trainers that build their own loss
    gap_sum: Optional[Tensor] = field(default=None, repr=False)  # detached, since the last log
    gap_steps: int = 0
    layer: int = 0  # where the gap is taken: 0 the LLM input, k >= 1 after decoder layer k (regap_fast.gap_layer)
    scale: Optional[TextNormScale] = None  # --regap-scale text-norm: the gap times a warm-up-frozen alpha

    def __deepcopy__(self, memo):
        """A copy of the model gets copies of the settings and modules, not the last forward's graph."""
        clone = memo[id(self)] = copy.copy(self)
        for name, value in vars(self).items():
            setattr(clone, name, None if name == "last_regap_term" else copy.deepcopy(value, memo))
        return clone

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


# --------------------------------------------------------------------------------------------------
# the fast path: the fused projector
# --------------------------------------------------------------------------------------------------


class _PooledCapture:
    """Projector mixin: while ``capture`` is a list, a plain call also appends its pooled output (one mean
    per image) to it, so that the model's own forward, run unchanged, hands REGAP the pooled image side."""

    capture: Optional[list] = None

    def forward(self, x: Tensor, image_mask: Optional[Tensor] = None, return_pooled: bool = False):
        if self.capture is None or return_pooled:
            return super().forward(x, image_mask, return_pooled)
        out, pooled = super().forward(x, image_mask, return_pooled=True)
        self.capture.append(pooled)
        return out


class _CapturingLlavaProjector(_PooledCapture, FusedLlavaProjector):
    pass


class _CapturingLinearProjector(_PooledCapture, FusedLinearProjector):
    pass


def _fused_projector(model: nn.Module, backend: str) -> tuple[str, nn.Module, nn.Module]:
    """(path, the model's projector, a fused one around its own layers); RegapError where none applies."""
    kind, paths = next((FUSABLE[c.__name__] for c in type(model).__mro__ if c.__name__ in FUSABLE),
                       (None, ()))
    if kind is None:
        raise RegapError(f"the fused projector exists for {', '.join(FUSABLE)}; {type(model).__name__} takes the "
                         "generic path (fuse_projector=None or False)")
    if type(model.get_input_embeddings()) is not nn.Embedding:
        raise RegapError(f"the fused projector needs a plain nn.Embedding input table (the caption side is pooled from "
                         f"its rows), got {type(model.get_input_embeddings()).__name__}")
    path = next((p for p in paths if isinstance(_get(model, p), nn.Module)), None)
    if path is None:
        raise RegapError(f"{type(model).__name__} has no projector at {' or '.join(paths)}")
    old = model.get_submodule(path)
    fused = _fused_llava(old, model.config, backend) if kind == "mlp2x_gelu" else _fused_linear(old, backend)
    return path, old, fused


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


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
                         f"projector_hidden_act={getattr(config, 'projector_hidden_act', None)!r}): the fused "
                         "projector is LLaVA-1.5's Linear -> GELU (exact) -> Linear only")
    with torch.device("meta"):  # shell only: the real layers are moved in below
        fused = _CapturingLlavaProjector(l1.in_features, l1.out_features, bias=l1.bias is not None, backend=backend)
    fused.linear_1, fused.linear_2 = l1, l2
    return fused.train(old.training)


def _fused_linear(old: nn.Module, backend: str) -> FusedLinearProjector:
    """A FusedLinearProjector holding ``old``'s own weight and bias (BLIP-2's language_projection)."""
    if type(old) is not nn.Linear:
        raise RegapError(f"unrecognised projector {type(old).__name__}: the fused projector expects BLIP-2's "
                         "language_projection to be one nn.Linear")
    with torch.device("meta"):
        fused = _CapturingLinearProjector(old.in_features, old.out_features, bias=old.bias is not None,
                                          backend=backend)
    fused.weight, fused.bias = old.weight, old.bias
    return fused.train(old.training)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, module)


def _restore_projector(model: nn.Module, state: RegapState) -> None:
    """The model's own projector back in place, holding the current weights."""
    old, fused = state.original_projector, state.fused
    if isinstance(fused, FusedLlavaProjector):
        old.linear_1, old.linear_2 = fused.linear_1, fused.linear_2
    else:
        old.weight, old.bias = fused.weight, fused.bias
    _set(model, state.projector_path, old.train(fused.training))
    state.fused = state.original_projector = None


def _choose_projector(model: nn.Module, state: RegapState, fuse_projector: Optional[bool]) -> None:
    """Install the fused projector where it applies (``fuse_projector`` None), must (True), or never (False)."""
    if state.fused is not None:
        if fuse_projector is False:
            _restore_projector(model, state)
        else:
            state.fused.backend = state.backend
        return
    if fuse_projector is False:
        return
    try:
        path, old, fused = _fused_projector(model, state.backend)
    except RegapError:
        if fuse_projector:
            raise
        return  # the generic path: same loss, without the fused epilogue
    _set(model, path, fused)
    state.fused, state.original_projector, state.projector_path = fused, old, path


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def apply_regap(model: nn.Module, regap_weight: float = 0.1, *, squared: bool = False, backend: str = "auto",
                special_token_ids: Iterable[int] = (), include_video: bool = True,
                fuse_projector: Optional[bool] = None, layer: int = 0, scale: str = "none",
                scale_warmup_steps: Optional[int] = None) -> nn.Module:
    """Add REGAP to ``model`` (in place; returned for chaining). See the module docstring.

    ``special_token_ids``: ids never counted as caption tokens, on top of every token id the config names
    (pass ``tokenizer.all_special_ids`` for chat templates with extra markers, e.g. an end-of-turn token
    your labels cover). ``include_video``: video placeholders count as image tokens. ``fuse_projector``:
    the fused projector where it applies (None), required (True: RegapError where it cannot), or never
    (False: the model's modules stay as they are). ``layer``: 0 takes the gap at the LLM input; k >= 1 after
    decoder layer k (generic path, same masks; the fused projector serves layer 0 only). ``scale="text-norm"``:
    the gap times alpha = 1 / mean caption-token norm at that layer, estimated over the first
    ``scale_warmup_steps`` optimizer steps (``RegapCallback`` counts them and saves alpha with each Trainer
    checkpoint; in a loop of your own call ``regap_state(model).scale.step()`` after each optimizer step and
    keep ``.scale.state_dict()``). Applying again updates every setting (and restarts the alpha estimate).
    """
    if isinstance(regap_weight, bool) or not isinstance(regap_weight, (int, float)) or regap_weight < 0:
        raise RegapError(f"regap_weight must be a number >= 0, got {regap_weight!r}")
    from ..backends import BACKENDS
    if backend not in BACKENDS:
        raise RegapError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    check_supported(model)
    layer = check_layer(layer, _decoder(model))
    if scale not in SCALES:
        raise RegapError(f"unknown REGAP scale {scale!r}; choose one of {SCALES}")
    if scale == "text-norm" and scale_warmup_steps is None:
        raise RegapError("scale='text-norm' needs scale_warmup_steps (the optimizer steps alpha is estimated over)")
    settings = dict(layer=layer, scale=TextNormScale(scale_warmup_steps) if scale == "text-norm" else None,
                    weight=float(regap_weight), squared=squared, backend=backend, include_video=include_video,
                    special_ids=torch.tensor(special_ids_of(model, special_token_ids), dtype=torch.long),
                    image_ids=torch.tensor(placeholder_ids(model, include_video), dtype=torch.long))
    state: Optional[RegapState] = model.__dict__.get("_regap")
    if state is None:
        state = model._regap = RegapState(**settings)
    else:
        state.__dict__.update(settings)
    _choose_projector(model, state, fuse_projector)
    _wrap_outermost(model, state)
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
    if state.fused is not None:
        _restore_projector(model, state)
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
    names = list(inspect.signature(inner).parameters)[1:]  # positional order after self

    @functools.wraps(inner)  # Trainer and TRL read the signature to keep batch columns
    def forward(self, *args, **kwargs):
        state: Optional[RegapState] = self.__dict__.get("_regap")
        if state is None:  # remove_regap ran while someone else's patch still calls us
            return inner(self, *args, **kwargs)
        given_caption = kwargs.pop("caption_mask", None)  # a batch may spell its caption tokens out
        named = dict(zip(names, args), **kwargs)
        # an outer REGAP wrapper (applied again on top of someone else's patch) already collects this forward
        if state.capturing or not _computes_regap(state, named):
            return inner(self, *args, **kwargs)
        input_ids, labels = _ids_and_labels(named)
        fast = _fast_path_applies(state, named)
        state.capturing = True
        try:
            with _PooledOutputs(state.fused) if fast else _gap_side(self, state) as seen:
                out = inner(self, *args, **kwargs)
        finally:
            state.capturing = False
        gap = _batch_gap(self, state, seen, fast, input_ids, labels, given_caption)
        if state.scale is not None:
            gap = _scaled(self, state, gap, seen[0], fast, input_ids, labels, given_caption)
        if self.training:
            state.record(gap)
        state.last_regap_term = state.weight * gap * _loss_share(labels, named.get("num_items_in_batch"))
        return _with_gap(out, gap, state.last_regap_term)

    forward._regap_wrapper = True
    return forward


def _present(value) -> bool:
    return value is not None and (not isinstance(value, Tensor) or value.numel() > 0)


def _computes_regap(state: RegapState, named: dict) -> bool:
    """Labels, a weight > 0 and images (or videos, when they count) in this forward."""
    visual = ("pixel_values", "mm_encoder_outputs") + (("pixel_values_videos",) if state.include_video else ())
    return state.weight > 0 and named.get("labels") is not None and any(_present(named.get(k)) for k in visual)


def _ids_and_labels(named: dict) -> tuple[Tensor, Tensor]:
    input_ids, labels = named.get("input_ids"), named["labels"]
    if input_ids is None:
        raise RegapError("REGAP needs input_ids with the labels (to find the image and caption tokens); "
                         "this batch has inputs_embeds only")
    check_labels(input_ids, labels)
    return input_ids, labels


def _fast_path_applies(state: RegapState, named: dict) -> bool:
    """The fused projector's pooled output is the image side when it runs on whole images, in this forward."""
    return (state.fused is not None and state.layer == 0 and named.get("image_sizes") is None
            and named.get("mm_encoder_outputs") is None)


class LanguageModelInputs:
    """With ``with``: the ``inputs_embeds`` that ``model``'s language model receives in the forwards run inside
    (a forward pre-hook on it, removed on exit), as a list.

    Entered and left outside torch.compile's graph: dynamo does not run a hook registered while it traces.
    """

    def __init__(self, model: nn.Module):
        self.model, self.seen, self.hook = model, [], None

    def _record(self, module, args, kwargs) -> None:
        self.seen.append(kwargs.get("inputs_embeds"))

    @torch.compiler.disable
    def __enter__(self) -> list:
        self.hook = _decoder(self.model).register_forward_pre_hook(self._record, with_kwargs=True)
        return self.seen

    @torch.compiler.disable
    def __exit__(self, *exc) -> None:
        self.hook.remove()


def _gap_side(model: nn.Module, state: RegapState):
    """What the generic path reads: the LLM's inputs_embeds (layer 0) or the output of decoder layer k."""
    return LanguageModelInputs(model) if state.layer == 0 else LayerOutput(_decoder(model), state.layer)


def _scaled(model: nn.Module, state: RegapState, gap: Tensor, side: Tensor, fast: bool, input_ids: Tensor,
            labels: Tensor, given_caption: Optional[Tensor]) -> Tensor:
    """The gap times the text-norm alpha; a training forward adds its caption tokens to alpha's estimate first."""
    if model.training and state.scale.frozen is None:
        caption = _caption(state, input_ids.to(side.device), labels, given_caption)
        rows = model.get_input_embeddings()(input_ids.to(side.device)) if fast else side  # fast: side is pooled
        state.scale.observe(rows, caption)
    return gap * state.scale.alpha


class _PooledOutputs:
    """With ``with``: the fused projector's pooled outputs (one mean per image) in the forwards run inside."""

    def __init__(self, projector: nn.Module):
        self.projector, self.seen = projector, []

    def __enter__(self) -> list:
        self.projector.capture = self.seen
        return self.seen

    def __exit__(self, *exc) -> None:
        self.projector.capture = None


def _batch_gap(model: nn.Module, state: RegapState, seen: list, fast: bool, input_ids: Tensor, labels: Tensor,
               given_caption: Optional[Tensor]) -> Tensor:
    """Mean over samples (with an image and a caption token) of ||mean image token - mean caption token||."""
    where = "the fused projector" if fast else "the language model"
    if not seen:
        raise RegapError(f"{where} did not run in this forward. Under torch.compile: a model of this class compiled "
                         "earlier in the process runs on without REGAP's hook (dynamo does not re-check module hooks); "
                         "call torch._dynamo.reset() before compiling the patched model")
    if len(seen) > 1 or seen[0] is None:
        raise RegapError(f"{where} ran {len(seen)} times in one forward (inputs_embeds given: "
                         f"{[s is not None for s in seen]}); REGAP expects one run on inputs_embeds")
    side = seen[0]
    if not fast and side.shape[:2] != input_ids.shape:
        raise RegapError(f"the language model received inputs_embeds {tuple(side.shape)} for input_ids "
                         f"{tuple(input_ids.shape)}: this model changes the sequence, REGAP cannot place its tokens")
    input_ids = input_ids.to(side.device)
    image_mask = torch.isin(input_ids, state.image_ids.to(side.device))
    caption = _caption(state, input_ids, labels, given_caption)
    _check_found(image_mask, caption, state)
    kwargs = dict(squared=state.squared, backend=state.backend)
    if fast:  # one mean per image from the projector; the caption side pooled from the embedding rows
        return modality_gap(side, input_ids, image_mask, caption,
                            embedding_weight=model.get_input_embeddings().weight, **kwargs)
    return modality_gap(side, side, image_mask, caption, **kwargs)


def _caption(state: RegapState, input_ids: Tensor, labels: Tensor, given: Optional[Tensor]) -> Tensor:
    if given is None:
        return caption_mask(input_ids, labels, state.special_ids)
    if not isinstance(given, Tensor) or given.dtype != torch.bool or given.shape != input_ids.shape:
        got = f"{given.dtype} {tuple(given.shape)}" if isinstance(given, Tensor) else type(given).__name__
        raise RegapError(f"caption_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {got}")
    return given.to(input_ids.device)


def _check_found(image_mask: Tensor, caption: Tensor, state: RegapState) -> None:
    """A batch with images must show them at placeholders, beside a caption: never a silent zero gap."""
    found = torch.stack([image_mask.any(), gap_samples(image_mask, caption).any()])
    has_images, has_pairs = found.tolist()  # one host sync
    if not has_images:
        raise RegapError(f"this batch has images but its input_ids hold no image placeholder "
                         f"(ids {state.image_ids.tolist()}): let the model's processor insert them")
    if not has_pairs:
        raise RegapError("no sample with image tokens has a caption token (a label != -100 that is not a special "
                         "token): check the labels, or pass caption_mask")


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
    """The model's output with ``loss`` = LM loss + the REGAP term, and ``lm_loss``, ``regap_gap``."""
    if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
        return (out[0] + regap_term.to(out[0].device),) + out[1:]
    values = dict(out.items(), loss=out.loss + regap_term.to(out.loss.device))
    return _with_regap_fields(type(out))(**values, lm_loss=out.loss, regap_gap=gap)


@functools.cache
def _with_regap_fields(output_class: type) -> type:
    """``output_class`` (a transformers ModelOutput dataclass) with two more fields, ``lm_loss`` and ``regap_gap``:
    an output that DDP (find_unused_parameters) and torch.compile can take apart and build again."""
    namespace = {"__annotations__": {"lm_loss": Optional[Tensor], "regap_gap": Optional[Tensor]},
                 "lm_loss": None, "regap_gap": None, "__module__": __name__,
                 "__doc__": f"{output_class.__name__} with the LM loss and the gap of REGAP."}
    return dataclass(type(f"{output_class.__name__}WithRegap", (output_class,), namespace))


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

    # the text-norm scale: counted in optimizer steps, saved with each checkpoint, restored on resume
    def on_step_end(self, args, state, control, model=None, **kwargs):
        regap = None if model is None else regap_state(model)
        if regap is not None and regap.scale is not None:
            regap.scale.step()

    def on_save(self, args, state, control, model=None, **kwargs):
        regap = None if model is None else regap_state(model)
        if regap is not None and regap.scale is not None and state.is_world_process_zero:
            save_scale(regap, _checkpoint_dir(args, state))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        regap = None if model is None else regap_state(model)
        if regap is not None and regap.scale is not None and state.global_step > 0:  # resumed
            load_scale(regap, _checkpoint_dir(args, state))

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


SCALE_FILE = "regap_scale.json"


def _checkpoint_dir(args, state):
    from pathlib import Path

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def save_scale(regap: RegapState, folder) -> None:
    """The text-norm scale's state (its frozen alpha, or the estimate so far) as ``folder/regap_scale.json``."""
    import json
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / SCALE_FILE).write_text(json.dumps(regap.scale.state_dict()) + "\n", encoding="utf-8")


def load_scale(regap: RegapState, folder) -> None:
    """Restore what ``save_scale`` wrote (exactly: JSON keeps a float's every bit)."""
    import json
    from pathlib import Path

    path = Path(folder) / SCALE_FILE
    if not path.is_file():
        raise RegapError(f"resuming with the text-norm REGAP scale, but {path} is missing: alpha cannot be restored "
                         f"(was the checkpoint written without RegapCallback?)")
    regap.scale.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
