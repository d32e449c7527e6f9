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

When a wrapper (PEFT's LoRA or ``modules_to_save``) sits on the fused projector or its layers, that forward
takes the generic path, which sees what the adapters computed.

lambda is the weight of the mean per-sample gap over the effective batch (every micro-batch of an optimizer
step, every rank): ``weigh_step`` sets a step's sample count; ``RegapCallback.attach(trainer)`` and
``RegapSFTTrainer`` call it for the Trainer. A forward on its own adds lambda x its batch's mean gap.

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
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..core import RegapError, caption_mask, check_labels, gap_samples, modality_gap
from ..gap_layer import SCALES, LayerOutput, TextNormScale, check_layer
from ..ops import gap_from_means
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
    step_weight: Optional[float] = None  # per-sample weight of the optimizer step in progress (see weigh_step)
    adds_term: bool = False  # a trainer adds last_regap_term to a loss of its own (RegapSFTTrainer)
    active: list = field(default_factory=lambda: [0])  # patched forwards running (shared with DataParallel replicas)
    pair_batches: int = 0  # training forwards with a sample that has image and caption tokens
    empty_batches: int = 0  # training forwards whose samples with images have no caption token
    eval_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # eval: samples, lm_loss x samples, gap x samples
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

    def record_eval(self, lm_loss: Tensor, gap: Tensor, samples: int) -> None:
        """Eval forwards, weighted by their batch size as the Trainer weighs its eval_loss."""
        sums = self.eval_sums
        sums[0] += samples
        sums[1] += samples * float(lm_loss.detach().float().mean())
        sums[2] += samples * float(gap.detach().float())

    def pop_eval(self) -> Optional[tuple[float, float]]:
        """(mean lm_loss, mean gap) of the eval forwards since the last call (averaged over ranks)."""
        total = _all_ranks_sum(torch.tensor(self.eval_sums, dtype=torch.float64))
        self.eval_sums = [0.0, 0.0, 0.0]
        return None if total[0] == 0 else (float(total[1] / total[0]), float(total[2] / total[0]))

    def pop_mean(self) -> Optional[float]:
        """Mean gap of the forwards since the last call (averaged over ranks under torch.distributed)."""
        total = torch.tensor([0.0, 0.0]) if self.gap_sum is None else \
            torch.stack([self.gap_sum.cpu(), torch.tensor(float(self.gap_steps))])
        self.gap_sum, self.gap_steps = None, 0
        total = _all_ranks_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else None


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _all_ranks_sum(total: Tensor) -> Tensor:
    """``total`` summed over the ranks under torch.distributed (itself otherwise), on the CPU."""
    if not _distributed():
        return total
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = total.to(device)
    torch.distributed.all_reduce(total)
    return total.cpu()


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

    ``model`` may be wrapped (torch.compile, DDP, FSDP, a PEFT model): the transformers model inside is patched,
    once, and the wrapper returned.
    """
    wrapper, model = model, _unwrapped(model)
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
                    # on the CPU even under torch.device("meta") (meta-device init, then to_empty): moved where needed
                    special_ids=torch.tensor(special_ids_of(model, special_token_ids), dtype=torch.long, device="cpu"),
                    image_ids=torch.tensor(placeholder_ids(model, include_video), dtype=torch.long, device="cpu"))
    state: Optional[RegapState] = model.__dict__.get("_regap")
    if state is None:
        state = model._regap = RegapState(**settings)
    else:
        state.__dict__.update(settings)
    _choose_projector(model, state, fuse_projector)
    _wrap_outermost(model, state)
    _guard_backbone(model, state)
    return wrapper


class _BackboneGuard:
    """Forward pre-hook on the backbone: a training forward that runs it with images but not the patched forward
    (TRL's SFTTrainer calls the backbone and its own fused LM head) would train without REGAP: a RegapError.
    An object holding the state, so that deep copies and pickles of the model guard their own state."""

    def __init__(self, state: RegapState):
        self.state = state

    def __call__(self, module, args, kwargs):
        state = self.state
        if module.training and state.weight > 0 and not state.active[0] and _present(kwargs.get("pixel_values")):
            raise RegapError("this training forward bypasses the patched model's forward (TRL's SFTTrainer computes "
                             "its loss from the backbone), so REGAP would be dropped: use "
                             "regap_fast.integrations.trl.RegapSFTTrainer")


def _backbone(model: nn.Module) -> Optional[nn.Module]:
    backbone = getattr(model, "base_model", model)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def _guard_backbone(model: nn.Module, state: RegapState, on: bool = True) -> None:
    """Install (``on``) or remove the backbone's _BackboneGuard."""
    backbone = _backbone(model)
    if backbone is None:
        return
    hooks = backbone._forward_pre_hooks
    for key in [k for k, h in hooks.items() if isinstance(h, _BackboneGuard)]:
        del hooks[key]
        backbone._forward_pre_hooks_with_kwargs.pop(key, None)
    if on:
        backbone.register_forward_pre_hook(_BackboneGuard(state), with_kwargs=True)


def _wrap_outermost(model: nn.Module, state: RegapState) -> None:
    """Wrap the forward the instance runs today (the class's, or one patched onto the instance, e.g. by TRL
    or Liger), unless it is already ours. An inner REGAP wrapper left below steps aside (see forward)."""
    current = model.__dict__.get("forward")
    if getattr(current, "_regap_wrapper", False):
        return
    state.inner_forward = getattr(current, "__func__", None) or type(model).forward
    model.forward = PatchedForward(model, state.inner_forward)
    # DataParallel replicas copy the instance's attributes: they must run the patched forward on themselves
    model._replicate_for_data_parallel = _PatchedReplicate(model)


class _PatchedReplicate:
    """A patched instance's ``_replicate_for_data_parallel`` (nn.DataParallel's per-device copy): the replica gets
    its own state (its flags are its thread's) and a forward bound to itself. Pickles as itself."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> nn.Module:
        model = self.model
        replica = type(model)._replicate_for_data_parallel(model)
        replica._regap = copy.copy(model._regap)  # same settings, own flags
        replica._regap.capturing = False
        replica.forward = PatchedForward(replica, model._regap.inner_forward)  # bound to the replica
        replica._replicate_for_data_parallel = _PatchedReplicate(replica)
        return replica

    def __reduce__(self):
        return _PatchedReplicate, (self.model,)


def remove_regap(model: nn.Module) -> nn.Module:
    """Undo ``apply_regap``: the original projector module (with the current weights) and forward."""
    model = _unwrapped(model)
    state: Optional[RegapState] = model.__dict__.pop("_regap", None)
    if state is None:
        raise RegapError("remove_regap: this model was not patched by apply_regap")
    if state.fused is not None:
        _restore_projector(model, state)
    model.__dict__.pop("_replicate_for_data_parallel", None)
    _guard_backbone(model, state, on=False)
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


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside the wrappers users put around it: torch.compile's OptimizedModule,
    DataParallel / DistributedDataParallel / FSDP(1) (``.module``), a PEFT model (its base model)."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif type(model).__name__ in ("DataParallel", "DistributedDataParallel", "FullyShardedDataParallel") \
                and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()  # peft.PeftModel -> the LoraModel's model, the transformers model
        else:
            return model


# --------------------------------------------------------------------------------------------------
# the patched forward
# --------------------------------------------------------------------------------------------------


class PatchedForward:
    """A patched instance's ``forward``: the REGAP forward bound to ``model``.

    An object rather than a bound method so that ``torch.save(model)`` / pickle brings the patch back
    (a bound method pickles as ``getattr(model, "forward")``, which loads as the class's forward) and
    DataParallel replicas can be bound to themselves. Trainer, TRL and ``generate`` read its signature:
    the wrapped forward's.
    """

    _regap_wrapper = True

    def __init__(self, model: nn.Module, inner: Callable):
        self.__self__, self.inner = model, inner
        # the unbound patched forward: accelerate and others rebind ``forward.__func__`` to wrap it
        self.__func__ = _patched_function(inner)
        self.__signature__ = inspect.signature(types.MethodType(inner, model))
        functools.update_wrapper(self, inner, updated=())
        del self.__wrapped__  # the signature is the bound one above, not the function's (with self)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return PatchedForward, (self.__self__, self.inner)


def _patched_function(inner: Callable) -> Callable:
    names = list(inspect.signature(inner).parameters)[1:]  # positional order after self

    @functools.wraps(inner)
    def forward(self, *args, **kwargs):
        state: Optional[RegapState] = self.__dict__.get("_regap")
        if state is None:  # remove_regap ran while someone else's patch still calls us
            return inner(self, *args, **kwargs)
        state.active[0] += 1
        try:
            return _regap_forward(self, state, inner, names, *args, **kwargs)
        finally:
            state.active[0] -= 1

    forward._regap_wrapper = True
    return forward


def _regap_forward(self: nn.Module, state: RegapState, inner: Callable, names: list, *args, **kwargs):
    given = {k: kwargs.pop(k) for k in ("caption_mask", "image_mask") if k in kwargs}  # never reach the model
    named = dict(zip(names, args), **kwargs)
    # an outer REGAP wrapper (applied again on top of someone else's patch) already collects this forward
    if state.capturing or not _computes_regap(state, named):
        return inner(self, *args, **kwargs)
    inputs = _regap_inputs(self, state, named, given)
    if inputs is None:  # inputs_embeds without image_mask and no placeholder embedding found: warned once
        return inner(self, *args, **kwargs)
    fast = _fast_path_applies(self, state, named, inputs)
    state.capturing = True
    capture = _PooledOutputs(self.get_submodule(state.projector_path)) if fast else _gap_side(self, state)
    seen = capture.__enter__()  # called, not `with`: torch.compile breaks the graph on a user context manager
    try:
        out = inner(self, *args, **kwargs)
    finally:
        capture.__exit__(None, None, None)
        state.capturing = False
    sums, count = _gap_sums(self, state, seen, fast, inputs)
    if state.scale is not None:
        sums = sums * _text_norm_alpha(self, state, seen[0], fast, inputs)
    gap = sums / count.clamp(min=1)
    if self.training:
        state.record(gap)
    elif out_loss(out) is not None:
        state.record_eval(out_loss(out), gap, inputs.input_ids.shape[0])
    state.last_regap_term = _regap_term(self, state, sums, gap, named)
    return _with_gap(out, gap, state.last_regap_term)


def out_loss(out) -> Optional[Tensor]:
    return out[0] if isinstance(out, tuple) else out.loss


def _present(value) -> bool:
    return value is not None and (not isinstance(value, Tensor) or value.numel() > 0)


def _computes_regap(state: RegapState, named: dict) -> bool:
    """Labels, a weight > 0 and images (or videos, when they count) in this forward."""
    visual = ("pixel_values", "mm_encoder_outputs") + (("pixel_values_videos",) if state.include_video else ())
    return state.weight > 0 and named.get("labels") is not None and any(_present(named.get(k)) for k in visual)


class _RegapInputs(NamedTuple):  # a tuple: torch.compile traces it without a graph break
    """Where REGAP looks in one batch: the token ids (labels stand in for them beside inputs_embeds), the image
    and caption tokens and, for packed rows, the sample of each token."""

    input_ids: Tensor
    image_mask: Optional[Tensor]  # None: the placeholders in input_ids
    caption: Tensor
    segments: Optional[Tensor]  # [B, N] sample index over the batch, or None: one sample per row
    from_ids: bool  # input_ids were given (the fused projector pools the caption from them)


def _regap_inputs(model: nn.Module, state: RegapState, named: dict, given: dict) -> Optional[_RegapInputs]:
    input_ids, labels = named.get("input_ids"), named["labels"]
    image_mask = given.get("image_mask")
    from_ids = input_ids is not None
    if not from_ids:  # inputs_embeds: the labelled tokens' ids are their labels
        embeds = named.get("inputs_embeds")
        check_labels(embeds[..., 0] if isinstance(embeds, Tensor) else labels, labels)
        input_ids = labels.clamp(min=0)
        if image_mask is None:
            image_mask = _placeholder_positions(model, state, embeds)
            if image_mask is None:
                _warn_once(state, "embeds", "REGAP: labels with inputs_embeds whose image placeholders cannot be "
                                            "found: pass image_mask (bool, like the labels); this batch trains on the "
                                            "LM loss alone")
                return None
    check_labels(input_ids, labels)
    if image_mask is not None and (not isinstance(image_mask, Tensor) or image_mask.dtype != torch.bool
                                   or image_mask.shape != input_ids.shape):
        raise RegapError(f"image_mask must be a bool tensor shaped like the labels {tuple(input_ids.shape)}")
    caption = _caption(state, input_ids, labels, given.get("caption_mask"))
    return _RegapInputs(input_ids, image_mask, caption, _segments(named, input_ids.shape), from_ids)


def _placeholder_positions(model: nn.Module, state: RegapState, embeds: Tensor) -> Optional[Tensor]:
    """[B, N] bool: where ``embeds`` holds an image placeholder's embedding (as the model finds them), or None."""
    table = model.get_input_embeddings()
    with torch.no_grad():  # the table may sit elsewhere than a batch not yet moved (the Trainer's step count)
        rows = table(state.image_ids.to(table.weight.device)).to(embeds.device, embeds.dtype)
        mask = (embeds.unsqueeze(2) == rows).all(-1).any(-1)
    return mask if bool(mask.any()) else None


def _warn_once(state: RegapState, key: str, message: str) -> None:
    warned = state.__dict__.setdefault("_warned", set())
    if key not in warned:
        warned.add(key)
        warnings.warn(message, stacklevel=4)


def _segments(named: dict, shape: torch.Size) -> Optional[Tensor]:
    """[B, N]: the packed sample of each token, numbered over the batch; None when each row is one sample.

    Samples start where ``position_ids`` (the text positions: row 0 of multimodal RoPE positions) restart at 0,
    or at ``cu_seq_lens_q`` (FlashAttention's padding-free layout, one row).
    """
    cu, pos = named.get("cu_seq_lens_q"), named.get("position_ids")
    if isinstance(cu, Tensor):
        if shape[0] != 1:
            raise RegapError(f"cu_seq_lens_q delimits the samples of one packed row, but this batch has {shape[0]} "
                             "rows: pack into one row, or pass position_ids that restart at 0 for each sample")
        starts = torch.zeros(shape, dtype=torch.bool, device=cu.device)
        starts[0, cu[:-1].long().clamp(max=shape[1] - 1)] = True
    elif isinstance(pos, Tensor):
        text = pos if pos.dim() == 2 else pos[0]
        if tuple(text.shape) != tuple(shape):
            raise RegapError(f"position_ids {tuple(pos.shape)} do not match input_ids {tuple(shape)}: REGAP cannot "
                             "tell where packed samples start")
        starts = text == 0
    else:
        return None
    starts = starts.clone()
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):  # one host sync, in forwards given position_ids only
        return None
    return (starts.flatten().long().cumsum(0) - 1).view(shape)


def _fast_path_applies(model: nn.Module, state: RegapState, named: dict, inputs: _RegapInputs) -> bool:
    """The fused projector's pooled output is the image side when it runs on whole images, unwrapped, in this
    forward. A wrapper around it (PEFT's LoRA or modules_to_save) or around its layers changes what it computes:
    the generic path then reads the LLM's input instead, which the adapters have reached."""
    if (state.fused is None or state.layer != 0 or not inputs.from_ids or inputs.segments is not None
            or inputs.image_mask is not None):
        return False
    if named.get("image_sizes") is not None or named.get("mm_encoder_outputs") is not None:
        return False
    projector = _get(model, state.projector_path)
    if not isinstance(projector, _PooledCapture):
        return False
    layers = [projector] if isinstance(projector, FusedLinearProjector) else [projector.linear_1, projector.linear_2]
    return all(type(m) in (nn.Linear, _CapturingLinearProjector) for m in layers)


class LanguageModelInputs:
    """With ``with``: the ``inputs_embeds`` that ``model``'s language model receives in the forwards run inside
    (a forward pre-hook on it, removed on exit), as a list.

    Entered and left outside torch.compile's graph: dynamo does not run a hook registered while it traces.
    """

    def __init__(self, model: nn.Module):
        self.model, self.seen, self.hook, self.decoder = model, [], None, None

    def _record(self, module, args, kwargs) -> None:
        if module is self.decoder:  # DataParallel replicas share their hook dicts with the original
            self.seen.append(kwargs.get("inputs_embeds"))

    @torch.compiler.disable
    def __enter__(self) -> list:
        self.decoder = _decoder(self.model)
        self.hook = self.decoder.register_forward_pre_hook(self._record, with_kwargs=True)
        return self.seen

    @torch.compiler.disable
    def __exit__(self, *exc) -> None:
        self.hook.remove()


def _gap_side(model: nn.Module, state: RegapState):
    """What the generic path reads: the LLM's inputs_embeds (layer 0) or the output of decoder layer k."""
    return LanguageModelInputs(model) if state.layer == 0 else LayerOutput(_decoder(model), state.layer)


def _text_norm_alpha(model: nn.Module, state: RegapState, side: Tensor, fast: bool, inputs: _RegapInputs) -> float:
    """The text-norm scale's alpha; a training forward adds its caption tokens to alpha's estimate first."""
    if model.training and state.scale.frozen is None:
        input_ids = inputs.input_ids.to(side.device)
        rows = model.get_input_embeddings()(input_ids) if fast else side  # fast: side holds the pooled image means
        state.scale.observe(rows, inputs.caption.to(side.device))
    return state.scale.alpha


class _PooledOutputs:
    """With ``with``: the fused projector's pooled outputs (one mean per image) in the forwards run inside."""

    def __init__(self, projector: nn.Module):
        self.projector, self.seen = projector, []

    def __enter__(self) -> list:
        self.projector.capture = self.seen
        return self.seen

    def __exit__(self, *exc) -> None:
        self.projector.capture = None


def _gap_sums(model: nn.Module, state: RegapState, seen: list, fast: bool,
              inputs: _RegapInputs) -> tuple[Tensor, Tensor]:
    """(sum of the per-sample gaps ||mean image token - mean caption token||, number of samples with both)."""
    where = "the fused projector" if fast else "the language model"
    if not seen:
        raise RegapError(f"{where} did not run in this forward. Under torch.compile: a model of this class compiled "
                         "earlier in the process runs on without REGAP's hook (dynamo does not re-check module hooks); "
                         "call torch._dynamo.reset() before compiling the patched model")
    if len(seen) > 1 or seen[0] is None:
        raise RegapError(f"{where} ran {len(seen)} times in one forward (inputs_embeds given: "
                         f"{[s is not None for s in seen]}); REGAP expects one run on inputs_embeds")
    side = seen[0]
    input_ids = inputs.input_ids.to(side.device)
    if not fast and side.shape[:2] != input_ids.shape:
        raise RegapError(f"the language model received inputs_embeds {tuple(side.shape)} for input_ids "
                         f"{tuple(input_ids.shape)}: this model changes the sequence, REGAP cannot place its tokens")
    image_mask = torch.isin(input_ids, state.image_ids.to(side.device)) if inputs.image_mask is None \
        else inputs.image_mask.to(side.device)
    caption = inputs.caption.to(side.device)
    kwargs = dict(squared=state.squared, backend=state.backend)
    if inputs.segments is not None:
        gaps, valid = _segment_gaps(side, image_mask, caption, inputs.segments.to(side.device), **kwargs)
        _check_found(model, state, image_mask, valid)
    else:
        valid = gap_samples(image_mask, caption)
        _check_found(model, state, image_mask, valid)
        if fast:  # one mean per image from the projector; the caption side pooled from the embedding rows
            gaps = modality_gap(side, input_ids, image_mask, caption, reduction="none",
                                embedding_weight=model.get_input_embeddings().weight, **kwargs)
        else:
            gaps = modality_gap(side, side, image_mask, caption, reduction="none", **kwargs)
    return gaps.sum(), valid.sum()


def _segment_gaps(side: Tensor, image_mask: Tensor, caption: Tensor, segments: Tensor, *, squared: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """Per packed sample: (gaps [S], which samples have image and caption tokens [S])."""
    count = int(segments.max()) + 1  # one host sync, packed batches only
    index, x = segments.flatten(), side.flatten(0, 1).float()

    def means(mask: Tensor) -> tuple[Tensor, Tensor]:
        m = mask.flatten().to(x.dtype)
        sums = x.new_zeros(count, x.shape[1]).index_add(0, index, x * m.unsqueeze(1))
        n = x.new_zeros(count).index_add(0, index, m)
        return sums / n.clamp(min=1).unsqueeze(1), n > 0

    (mu_image, has_image), (mu_caption, has_caption) = means(image_mask), means(caption)
    valid = has_image & has_caption
    return gap_from_means(mu_image, mu_caption, valid, reduction="none", squared=squared, backend=backend), valid


def _caption(state: RegapState, input_ids: Tensor, labels: Tensor, given: Optional[Tensor]) -> Tensor:
    if given is None:
        return caption_mask(input_ids, labels, state.special_ids)
    if not isinstance(given, Tensor) or given.dtype != torch.bool or given.shape != input_ids.shape:
        got = f"{given.dtype} {tuple(given.shape)}" if isinstance(given, Tensor) else type(given).__name__
        raise RegapError(f"caption_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {got}")
    return given.to(input_ids.device)


EMPTY_BATCHES_LIMIT = 8  # training forwards without a caption token, none with one: the labels are wrong


def _check_found(model: nn.Module, state: RegapState, image_mask: Tensor, valid: Tensor) -> None:
    """A batch with images must show them at placeholders (else a RegapError, never a silent zero gap). A batch
    whose samples with images have no caption token adds a zero term, counted; a run of nothing but such batches
    is a RegapError after EMPTY_BATCHES_LIMIT training forwards."""
    if torch.compiler.is_compiling():  # the checks read values: eager only, a compiled graph would break on them
        return
    found = torch.stack([image_mask.any(), valid.any()])
    has_images, has_pairs = found.tolist()  # one host sync
    if not has_images:
        raise RegapError(f"this batch has images but its input_ids hold no image placeholder "
                         f"(ids {state.image_ids.tolist()}): let the model's processor insert them")
    if not model.training:
        return
    if has_pairs:
        state.pair_batches += 1
        return
    state.empty_batches += 1
    _warn_once(state, "empty", "REGAP: a labelled batch in which no sample with image tokens has a caption token "
                               "(a label != -100 that is not a special token) adds a zero REGAP term; "
                               "regap_state(model).empty_batches counts them")
    if state.pair_batches == 0 and state.empty_batches >= EMPTY_BATCHES_LIMIT:
        raise RegapError(f"no sample with image tokens has had a caption token in {state.empty_batches} training "
                         "forwards: REGAP adds nothing; label the answer tokens (not only special tokens), or pass "
                         "caption_mask")


def _regap_term(model: nn.Module, state: RegapState, sums: Tensor, gap: Tensor, named: dict) -> Tensor:
    """lambda x this forward's share of the mean gap over the optimizer step's samples (see weigh_step); outside
    a weighed step, lambda x the mean gap of this forward's samples."""
    if model.training and state.step_weight is not None:
        return state.weight * state.step_weight * sums
    if model.training and named.get("num_items_in_batch") is not None:
        raise RegapError("a Trainer-style num_items_in_batch without REGAP's step weighing: call "
                         "regap_fast.RegapCallback.attach(trainer) before trainer.train() (RegapSFTTrainer does it)")
    return state.weight * gap


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
# one lambda for every layout: the effective batch's mean gap
# --------------------------------------------------------------------------------------------------


def gap_samples_in(model: nn.Module, batch: dict) -> int:
    """How many samples of ``batch`` (a dict of model inputs) REGAP counts: those with image and caption tokens
    (per packed sample where the rows are packed). 0 where the forward would compute no REGAP term."""
    model = _unwrapped(model)
    state: RegapState = model._regap
    named = dict(batch)
    given = {k: named.pop(k) for k in ("caption_mask", "image_mask") if k in named}
    if not _computes_regap(state, named):
        return 0
    inputs = _regap_inputs(model, state, named, given)
    if inputs is None:
        return 0
    image_mask = torch.isin(inputs.input_ids, state.image_ids.to(inputs.input_ids.device)) \
        if inputs.image_mask is None else inputs.image_mask
    caption = inputs.caption.to(image_mask.device)
    if inputs.segments is None:
        return int(gap_samples(image_mask, caption).sum())
    index = inputs.segments.to(image_mask.device).flatten()
    count = int(index.max()) + 1
    has = [torch.zeros(count, dtype=torch.long, device=index.device).index_add(0, index, m.flatten().long()) > 0
           for m in (image_mask, caption)]
    return int((has[0] & has[1]).sum())


def weigh_step(model: nn.Module, micro_batches: list, loss_scale: float = 1.0, all_ranks: bool = True) -> int:
    """Start an optimizer step over ``micro_batches`` (this rank's): until the next call, each training forward's
    REGAP term is ``lambda * loss_scale * (sum of its per-sample gaps) / S``, S = the samples with a gap in the
    micro-batches of every rank (summed over torch.distributed's ranks when ``all_ranks``).

    ``loss_scale`` undoes what the training loop does to the loss before the gradients meet: with micro-batch
    losses divided by G and DDP averaging over W ranks, pass ``G * W``; the summed, averaged gradient is then
    that of ``lambda * mean gap`` over the effective batch. The Trainer integration (``RegapCallback.attach``,
    ``RegapSFTTrainer``) calls this for you. Returns S.
    """
    state = regap_state(model)
    if state is None:
        raise RegapError("weigh_step: the model is not patched by apply_regap")
    local = torch.tensor([float(sum(gap_samples_in(model, b) for b in micro_batches))], dtype=torch.float64)
    total = int(_all_ranks_sum(local)[0]) if all_ranks else int(local[0])
    state.step_weight = loss_scale / max(total, 1)
    return total


def end_weighing(model: nn.Module) -> None:
    """Back to the default: each forward's term is lambda x the mean gap of its own samples."""
    state = regap_state(model)
    if state is not None:
        state.step_weight = None


def _trainer_loss_scale(trainer, num_items_in_batch, micro_batches: int, term_in_model_loss: bool) -> float:
    """What the Trainer's arithmetic divides a micro-batch's REGAP term by before DDP averages the gradients
    over the ranks (transformers 5: Trainer.compute_loss and training_step), times the number of ranks."""
    args = trainer.args
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:  # Trainer.training_step's rule
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) \
            or trainer.compute_loss_func is not None
    ranks = trainer.accelerator.num_processes
    scale = ranks * (1 if scaled else micro_batches)
    if term_in_model_loss and args.average_tokens_across_devices and num_items_in_batch is not None \
            and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None):
        scale /= ranks // trainer.get_tp_size()  # Trainer.compute_loss multiplies the model's loss by this
    return scale


def weigh_trainer_steps(trainer, term_in_model_loss: bool = True) -> None:
    """Make ``trainer`` (a transformers Trainer) weigh each optimizer step's REGAP terms by ``weigh_step``: its
    ``get_batch_samples``, which fetches a step's micro-batches before the first forward, is wrapped on the
    instance. ``term_in_model_loss``: the term reaches the optimiser inside the model's loss (Trainer), or is
    added to the trainer's own loss afterwards (RegapSFTTrainer)."""
    if trainer.__dict__.get("_regap_weighing"):
        return
    if trainer.args.n_gpu > 1:
        raise RegapError("REGAP under the Trainer's DataParallel (several GPUs in one process) is not supported: "
                         "start one process per GPU (torchrun / accelerate launch)")
    if trainer.label_smoother is not None or (term_in_model_loss and trainer.compute_loss_func is not None):
        raise RegapError("with label smoothing or a compute_loss_func the Trainer computes the loss from the logits "
                         "without the model's loss, so REGAP's term would be dropped: use the default loss")
    fetch = trainer.get_batch_samples

    def get_batch_samples(epoch_iterator, num_batches, device):
        batches, num_items = fetch(epoch_iterator, num_batches, device)
        if batches:
            weigh_step(trainer.model, batches, _trainer_loss_scale(trainer, num_items, len(batches),
                                                                   term_in_model_loss))
        return batches, num_items

    trainer.get_batch_samples = get_batch_samples
    trainer._regap_weighing = True


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------


class RegapCallback(TrainerCallback):
    """Puts ``regap_gap`` (the mean gap of the training forwards since the last log) into the Trainer's logs,
    and ``eval_lm_loss`` / ``eval_regap_gap`` beside ``eval_loss``.

    ``RegapCallback.attach(trainer)`` also makes the Trainer weigh each optimizer step's gaps as one mean over
    its effective batch (``weigh_trainer_steps``), and puts the callback in front of the reporters (TensorBoard,
    wandb, ...), which the Trainer calls first otherwise.
    """

    _warned = False

    @classmethod
    def attach(cls, trainer, term_in_model_loss: bool = True) -> "RegapCallback":
        if patched_module(trainer.model) is None:
            raise RegapError("RegapCallback.attach: the trainer's model is not patched; call "
                             "regap_fast.apply_regap(model) first")
        weigh_trainer_steps(trainer, term_in_model_loss)
        existing = next((c for c in trainer.callback_handler.callbacks if isinstance(c, cls)), None)
        if existing is not None:
            return existing
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            end_weighing(model)

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
        if logs is None or model is None:
            return
        regap = regap_state(model)
        if "eval_loss" in logs and regap is not None:
            means = regap.pop_eval()
            if means is not None:
                logs["eval_lm_loss"], logs["eval_regap_gap"] = means
            return
        if "loss" not in logs:  # training logs only
            return
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
