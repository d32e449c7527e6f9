"""What REGAP costs a projector's training step in memory traffic, counted op by op on the CPU.

``ActivationPasses`` (a ``TorchDispatchMode``) adds up the bytes of every activation-sized tensor
(at least B * Ni * D distinct elements; a stride-0 expanded view counts only the elements it really
has) that each aten op reads or writes, and divides by the bytes of one ``[B, Ni, D]`` activation:
the number of activation passes. Three things a plain dispatch-mode count would miss are counted:

* work inside one aten op: each op runs under the profiler, and a copy it makes of an activation
  inside itself (``baddbmm``/``addmm`` copying their accumulate input C into the result first) counts
  as a write and a read (the GEMM reads it back);
* work inside our custom ops: a ``regap_fast`` op runs its Python implementation under the mode, so
  its aten ops are counted one by one;
* Triton kernels (not aten ops): each projector kernel adds the traffic its contract states (the GELU
  pass reads pre and writes h; the dGELU pass reads dh and pre and writes dpre).

Allocations (``empty``) move no bytes and are not counted.
"""

import math

import pytest
import torch
from torch._library.custom_ops import OPDEFS  # a custom op's Python implementation (private, test-only)
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from regap_fast import FusedLinearProjector, FusedLlavaProjector, backends, fused_gap_loss, gap_from_means

from helpers import all_backend_params

B, NI, DV, D = 4, 24, 16, 64  # LLaVA-1.5's proportions: Dv = D / 4, Ni >> 1
LAMBDA = 0.1

# ops that move no bytes: views and allocations
_NO_COPY = {torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default, torch.ops.aten.empty.memory_format,
            torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}
# ops whose own inputs and outputs already are the copy: a copy_ inside them is not extra
_COPY_OPS = {"aten::_to_copy", "aten::clone", "aten::copy_", "aten::contiguous", "aten::_copy_from"}
_INNER_COPIES = {"aten::copy_", "aten::fill_", "aten::zero_"}


def _distinct_elements(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


class ActivationPasses(TorchDispatchMode):
    """Counts the [B, Ni, D]-activation passes of every aten op (and custom-op body) run under it."""

    def __init__(self, activation_elements: int):
        super().__init__()
        self.threshold = activation_elements
        self.bytes = 0
        self.ops: list[str] = []

    def add(self, what: str, elements: int, element_size: int) -> None:
        if elements >= self.threshold:
            self.bytes += elements * element_size
            self.ops.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("regap_fast::"):  # count the op's body, aten op by aten op
            with self:
                return OPDEFS[name]._init_fn(*args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = func(*args, **kwargs)
        # a view returns an alias it does not write; an in-place op (add_) returns the tensor it writes
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not is_view and func not in _NO_COPY:
            flat, _ = tree_flatten((args, kwargs, out))
            for t in flat:
                if isinstance(t, torch.Tensor):
                    self.add(str(func), _distinct_elements(t), t.element_size())
            if f"aten::{func._schema.name.split('::')[1]}" not in _COPY_OPS:
                self._inner_copies(prof, str(func))
        return out

    def _inner_copies(self, prof, outer: str) -> None:
        for e in prof.events():
            if e.name in _INNER_COPIES and e.cpu_parent is not None and e.input_shapes and e.input_shapes[0]:
                elements = math.prod(e.input_shapes[0])
                self.add(f"{outer} > {e.name}", elements, 4)  # written, then read by the op around it
                self.add(f"{outer} > {e.name} (read back)", elements, 4)

    def passes(self, element_size: int = 4) -> float:
        return self.bytes / (self.threshold * element_size)


def _count_kernels(monkeypatch, counter: ActivationPasses, backend: str) -> None:
    """Triton's (and CUDA's) projector passes: the traffic their contracts state; what the kernel's host
    code and the Triton interpreter do around the launch (allocations, the interpreter's copies to and
    from its NumPy buffers) is not counted."""
    if backend == "torch":
        return
    mod = backends.get(backend, "projector")
    gelu, dgelu = mod.gelu_pool_forward, mod.dgelu_backward

    def gelu_pool_forward(pre, *args):
        counter.add("gelu_pool_forward", 2 * pre.numel(), pre.element_size())  # read pre, write h
        with _disable_current_modes():
            return gelu(pre, *args)

    def dgelu_backward(dh, pre, *args):
        counter.add("dgelu_backward", 3 * pre.numel(), pre.element_size())  # read dh and pre, write dpre
        with _disable_current_modes():
            return dgelu(dh, pre, *args)

    monkeypatch.setattr(mod, "gelu_pool_forward", gelu_pool_forward)
    monkeypatch.setattr(mod, "dgelu_backward", dgelu_backward)


def _count(step, monkeypatch=None, backend="torch") -> tuple[float, list[str]]:
    counter = ActivationPasses(B * NI * D)
    if monkeypatch is not None:
        _count_kernels(monkeypatch, counter, backend)
    with counter:
        step()
    return counter.passes(), counter.ops


def _inputs():
    x = torch.randn(B, NI, DV)  # stage 1: the vision features need no gradient
    grad_out = torch.randn(B, NI, D)  # stands in for the LM loss's gradient w.r.t. the image embeddings
    mu_caption = torch.randn(B, D)
    return x, grad_out, mu_caption


def _llava_steps(backend="torch"):
    torch.manual_seed(0)
    proj = FusedLlavaProjector(DV, D, backend=backend)
    x, grad_out, mu_caption = _inputs()

    def plain():
        proj(x).backward(grad_out)

    def fused():
        out, pooled = proj(x, return_pooled=True)
        gap = gap_from_means(pooled, mu_caption, backend="torch")
        torch.autograd.backward([out, LAMBDA * gap], [grad_out, None])

    def unfused():  # the naive way: pool the outputs after the fact
        out = proj(x)
        caption = mu_caption.unsqueeze(1).expand(B, 3, D)
        gap = fused_gap_loss(out, caption, backend="torch")
        torch.autograd.backward([out, LAMBDA * gap], [grad_out, None])

    return plain, fused, unfused


def test_counter_sees_a_copy_inside_one_aten_op():
    """baddbmm with a stride-0 accumulate input writes it in full into the result and reads it back: 3
    passes, not the 1 its arguments show (the previous torch-backend dgrad hid 2 passes this way)."""
    vec = torch.randn(B, 1, D).expand(B, NI, D)
    a, w = torch.randn(B, NI, DV), torch.randn(DV, D).unsqueeze(0).expand(B, DV, D)
    passes, ops = _count(lambda: torch.baddbmm(vec, a, w))
    assert passes >= 2.95, ops
    explicit, _ = _count(lambda: torch.bmm(a, w).add_(vec))
    assert explicit >= 2.95  # mm + an explicit add: the same traffic, now visible op by op


def test_counter_sees_inside_the_custom_ops():
    """The fused step's ops are custom ops: their bodies must be counted, or the fused step would look
    almost free."""
    _, fused, _ = _llava_steps()
    passes, ops = _count(fused)
    assert passes >= 10 and any("gelu_backward" in op for op in ops), ops


def test_torch_backend_regap_adds_three_passes():
    """The plain-PyTorch backend: one read of h to pool it, and the explicit add of the per-sample vector
    to dh (a read and a write). Nothing else, and nothing hidden."""
    plain, fused, _ = _llava_steps("torch")
    base, base_ops = _count(plain)
    with_regap, regap_ops = _count(fused)
    assert base >= 10, f"the counter missed the plain step's passes ({base:.2f}): {base_ops}"
    assert with_regap - base == pytest.approx(3.0, abs=0.05), (base, with_regap, regap_ops)


@pytest.mark.parametrize("backend", [p for p in all_backend_params("projector") if p.values[0] != "torch"])
def test_kernel_backends_regap_adds_no_pass(backend, monkeypatch):
    """The kernel backends pool h inside the GELU pass and add the vector inside the dGELU pass (which
    also folds db1, a pass the plain step spends on its own): REGAP adds no activation pass."""
    plain, fused, _ = _llava_steps(backend)
    base, _ = _count(plain)
    with_regap, ops = _count(fused, monkeypatch, backend)
    assert with_regap - base <= 0.05, (base, with_regap, ops)


def test_counter_sees_the_unfused_regap_passes():
    """The same count on the naive step (pool the outputs, broadcast the gradient back, add it): the
    counter must see its extra passes."""
    plain, _, unfused = _llava_steps()
    assert _count(unfused)[0] - _count(plain)[0] >= 2


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_linear_projector_regap_adds_no_output_pass(x_needs_grad):
    """MiniGPT-4's linear projector: the pooled output is mean(x) @ W^T + b, so REGAP reads only the
    (narrower) input; with a trainable input it adds the per-sample vector to dx explicitly."""
    torch.manual_seed(0)
    proj = FusedLinearProjector(DV, D, backend="torch")
    x, grad_out, mu_caption = _inputs()
    x.requires_grad_(x_needs_grad)

    def plain():
        proj(x).backward(grad_out)

    def fused():
        out, pooled = proj(x, return_pooled=True)
        torch.autograd.backward([out, LAMBDA * gap_from_means(pooled, mu_caption)], [grad_out, None])

    extra = _count(fused)[0] - _count(plain)[0]
    assert extra <= 0.05, f"REGAP adds {extra:.2f} [B, Ni, D] passes to the linear projector"
