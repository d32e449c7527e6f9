"""Where the gap is taken and how it is scaled: the REGAP paper's choices, as options of both trainers.

* ``layer``: 0 is the language model's input (the default; the fused projector path serves it); k >= 1 the
  hidden states after decoder layer k (the output of the k-th block, before any final norm), read by a
  forward hook on that block (``LayerOutput``). The paper regularises the first layer (its ablation: later
  layers made safety worse); k = 1 is that reading of "the first layer" after the input.
* ``TextNormScale`` (``--regap-scale text-norm``): the gap multiplied by alpha = 1 / (mean L2 norm of the
  caption tokens at that layer), estimated over the first N optimizer steps (each step's estimate is the
  running mean so far), then frozen and saved with the checkpoint. This is MIR's text-centric
  normalisation, the most plausible reading of the paper's "alpha computed and fixed during warm-up"
  (its exact formula is not public). It makes lambda comparable across families whose embeddings differ in
  scale (Gemma multiplies its embeddings by sqrt(hidden size)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .core import RegapError

SCALES = ("none", "text-norm")


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers language model (``model.layers``, ``decoder.layers``, ``h``, ...):
    the longest ModuleList of blocks under it."""
    found = [m for name, m in language_model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks")]
    if not found:
        raise RegapError(f"cannot find the decoder layers of {type(language_model).__name__} (no 'layers' list)")
    return max(found, key=len)


def check_layer(layer, language_model: nn.Module) -> int:
    """``layer`` as an int in [0, number of decoder layers], or one RegapError."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise RegapError(f"the REGAP layer must be an int >= 0 (0: the LLM input), got {layer!r}")
    if layer > 0 and layer > len(decoder_layers(language_model)):
        raise RegapError(f"REGAP layer {layer} does not exist: the language model has "
                         f"{len(decoder_layers(language_model))} decoder layers")
    return layer


class LayerOutput:
    """With ``with``: the hidden states after decoder layer ``layer`` (>= 1) of ``language_model`` in the
    forwards run inside (a forward hook on that block, removed on exit), as a list."""

    def __init__(self, language_model: nn.Module, layer: int):
        self.block = decoder_layers(language_model)[layer - 1]
        self.seen, self.hook = [], None

    def _record(self, module, args, output) -> None:
        self.seen.append(output[0] if isinstance(output, (tuple, list)) else output)

    # outside torch.compile's graph (dynamo does not run a hook registered while it traces); torch's own lazy
    # form of torch.compiler.disable, which imports torch._dynamo (seconds) on the first call, not at import
    @torch._disable_dynamo
    def __enter__(self) -> list:
        self.hook = self.block.register_forward_hook(self._record)
        return self.seen

    @torch._disable_dynamo
    def __exit__(self, *exc) -> None:
        self.hook.remove()


class TextNormScale:
    """alpha = 1 / mean L2 norm of the caption tokens, estimated over the first ``warmup_steps`` optimizer steps
    and frozen after them. ``observe`` the caption rows of each training forward, ``step()`` after each
    optimizer step. Until frozen, ``alpha`` is the running estimate: every step before this one (over all
    processes: ``step()`` sums the step's norms across ranks under torch.distributed) plus what this process
    has seen in this step; 1.0 before any caption token."""

    def __init__(self, warmup_steps: int):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise RegapError(f"the text-norm scale needs >= 1 warm-up step to estimate alpha, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.norm_sum, self.tokens, self.steps = 0.0, 0, 0  # over the finished steps, all processes
        self.pending_sum, self.pending_tokens = 0.0, 0  # this step, this process
        self.frozen: Optional[float] = None

    @property
    def alpha(self) -> float:
        if self.frozen is not None:
            return self.frozen
        norm, tokens = self.norm_sum + self.pending_sum, self.tokens + self.pending_tokens
        return tokens / norm if norm > 0 else 1.0

    def observe(self, hidden: Tensor, caption_mask: Tensor) -> None:
        """Add the caption tokens' norms (``hidden [B, T, D]`` at ``caption_mask [B, T]``), until frozen."""
        if self.frozen is not None:
            return
        with torch.no_grad():
            rows = hidden.detach()[caption_mask.to(hidden.device)]
            self.observe_sums(float(torch.linalg.vector_norm(rows.double(), dim=-1).sum()), rows.shape[0])

    def observe_sums(self, norm_sum: float, tokens: int) -> None:
        """The same from sums already taken."""
        if self.frozen is None:
            self.pending_sum += float(norm_sum)
            self.pending_tokens += int(tokens)

    def step(self) -> None:
        """One optimizer step done (every process calls it): its norms join the estimate; after ``warmup_steps``
        steps alpha is frozen."""
        if self.frozen is not None:
            return
        step = torch.tensor([self.pending_sum, float(self.pending_tokens)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            step = step.to(device)
            torch.distributed.all_reduce(step)
        total = step.tolist()
        self.norm_sum += total[0]
        self.tokens += int(round(total[1]))
        self.pending_sum, self.pending_tokens = 0.0, 0
        self.steps += 1
        if self.steps >= self.warmup_steps:
            if self.tokens == 0:
                raise RegapError(f"the text-norm scale saw no caption token in {self.steps} warm-up steps")
            self.frozen = self.alpha

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "norm_sum": self.norm_sum, "tokens": self.tokens,
                "steps": self.steps, "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps = int(state["warmup_steps"])
        self.norm_sum, self.tokens = float(state["norm_sum"]), int(state["tokens"])
        self.steps, self.frozen = int(state["steps"]), state["frozen"]
        self.pending_sum, self.pending_tokens = 0.0, 0
