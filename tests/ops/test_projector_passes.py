"""What REGAP costs a projector's training step in memory traffic, counted op by op on the CPU.

A ``TorchDispatchMode`` sees every aten op of one forward + backward and adds up the bytes of each
activation-sized tensor it reads or writes (a tensor with at least B * Ni * D distinct elements;
a stride-0 expanded view counts only the elements it really has). Divided by the bytes of one
``[B, Ni, D]`` activation, that is the number of activation passes. The GPU kernels fold REGAP's
work into passes that exist anyway; the torch backend (what CI and every CPU user runs) may add
one read of the hidden state to pool it, and nothing else.

The count is of the aten ops that autograd and the projector call: work a kernel does inside one op
(cuBLAS reading a GEMM's accumulate input, for instance) is not counted.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from regap_fast import FusedLinearProjector, FusedLlavaProjector, fused_gap_loss, gap_from_means

B, NI, DV, D = 4, 24, 16, 64  # LLaVA-1.5's proportions: Dv = D / 4, Ni >> 1
LAMBDA = 0.1

# ops that return a view of their input move no bytes
_NO_COPY = {torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default}


def _distinct_elements(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


class ActivationPasses(TorchDispatchMode):
    """Counts the [B, Ni, D]-activation passes of every aten op run under it."""

    def __init__(self, activation_elements: int):
        super().__init__()
        self.threshold = activation_elements
        self.bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        is_view = any(r.alias_info is not None for r in func._schema.returns)
        if not is_view and func not in _NO_COPY:
            flat, _ = tree_flatten((args, kwargs or {}, out))
            for t in flat:
                if isinstance(t, torch.Tensor) and _distinct_elements(t) >= self.threshold:
                    self.bytes += _distinct_elements(t) * t.element_size()
                    self.ops.append(str(func))
        return out

    def passes(self, element_size: int) -> float:
        return self.bytes / (self.threshold * element_size)


def _count(step) -> tuple[float, list[str]]:
    counter = ActivationPasses(B * NI * D)
    with counter:
        step()
    return counter.passes(4), counter.ops


def _inputs():
    x = torch.randn(B, NI, DV)  # stage 1: the vision features need no gradient
    grad_out = torch.randn(B, NI, D)  # stands in for the LM loss's gradient w.r.t. the image embeddings
    mu_text = torch.randn(B, D)
    return x, grad_out, mu_text


def _llava_steps():
    torch.manual_seed(0)
    proj = FusedLlavaProjector(DV, D, backend="torch")
    x, grad_out, mu_text = _inputs()

    def plain():
        out = proj(x)
        out.backward(grad_out)

    def fused():
        out, pooled = proj(x, return_pooled=True)
        gap = gap_from_means(pooled, mu_text)
        torch.autograd.backward([out, LAMBDA * gap], [grad_out, None])

    def unfused():  # the naive way: pool the outputs after the fact
        out = proj(x)
        text = mu_text.unsqueeze(1).expand(B, 3, D)
        gap = fused_gap_loss(out, text, backend="torch")
        torch.autograd.backward([out, LAMBDA * gap], [grad_out, None])

    return plain, fused, unfused


def test_llava_projector_regap_adds_at_most_one_pass():
    plain, fused, _ = _llava_steps()
    base, base_ops = _count(plain)
    with_regap, regap_ops = _count(fused)
    extra = with_regap - base
    assert base >= 10, f"the counter missed the plain step's passes ({base:.2f}): {base_ops}"
    assert extra <= 1.05, f"REGAP adds {extra:.2f} activation passes ({base:.2f} -> {with_regap:.2f}): {regap_ops}"


def test_counter_sees_the_unfused_regap_passes():
    """The same count on the naive step (pool the outputs, broadcast the gradient back, add it): the
    counter must see its extra passes, or the test above could not fail."""
    plain, _, unfused = _llava_steps()
    assert _count(unfused)[0] - _count(plain)[0] >= 2


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_linear_projector_regap_adds_no_output_pass(x_needs_grad):
    """MiniGPT-4's linear projector: the pooled output is pooled_x @ W^T + b, so REGAP reads only
    the (narrower) input; with a trainable input its gradient rides in the dgrad GEMM."""
    torch.manual_seed(0)
    proj = FusedLinearProjector(DV, D, backend="torch")
    x, grad_out, mu_text = _inputs()
    x.requires_grad_(x_needs_grad)

    def plain():
        proj(x).backward(grad_out)

    def fused():
        out, pooled = proj(x, return_pooled=True)
        torch.autograd.backward([out, LAMBDA * gap_from_means(pooled, mu_text)], [grad_out, None])

    extra = _count(fused)[0] - _count(plain)[0]
    assert extra <= 0.05, f"REGAP adds {extra:.2f} activation passes to the linear projector"
