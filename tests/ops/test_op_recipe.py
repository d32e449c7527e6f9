"""The one op recipe, checked for every op of every backend: ``torch.library.opcheck`` (schema, fake
implementation, autograd registration, AOT dispatch with dynamic shapes) on each custom op, and
``torch.compile(fullgraph=True)`` of each functional (no graph break, the eager numbers)."""

import pytest
import torch

from regap_fast import (fused_gap_loss, gap_from_means, linear_projector, llava_projector, masked_mean,
                        pooled_text_embeddings)

from helpers import DEVICE, all_backend_params, random_mask, rel_err

BACKENDS = all_backend_params()
OPS = torch.ops.regap_fast


def _gap_args(backend):
    img = torch.randn(3, 8, 16, device=DEVICE, requires_grad=True)
    cap = torch.randn(3, 6, 16, device=DEVICE, requires_grad=True)
    return (img, cap, random_mask(3, 8, DEVICE, empty_rows=(1,)), random_mask(3, 6, DEVICE), "mean", False, backend)


def _projector_args(backend, bias=True):
    B, n, Dv, D = 3, 5, 8, 12
    x = torch.randn(B * n, Dv, device=DEVICE, requires_grad=True)
    w1, w2 = (torch.randn(D, k, device=DEVICE, requires_grad=True) for k in (Dv, D))
    b1, b2 = (torch.randn(D, device=DEVICE, requires_grad=True) if bias else None for _ in range(2))
    mask = random_mask(B, n, DEVICE, empty_rows=(2,))
    return (x, w1, b1, w2, b2, mask.reshape(-1), mask.sum(1, dtype=torch.float32), n, backend)


def _linear_args(backend):
    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(12, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(12, device=DEVICE, requires_grad=True)
    return (x, w, b, random_mask(3, 5, DEVICE, empty_rows=(0,)), backend)


CASES = {
    "gap_loss_forward": (OPS.gap_loss_forward, _gap_args),
    "masked_mean_forward": (OPS.masked_mean_forward,
                            lambda b: (torch.randn(3, 7, 10, device=DEVICE, requires_grad=True),
                                       random_mask(3, 7, DEVICE, empty_rows=(0,)), b)),
    "gather_mean_forward": (OPS.gather_mean_forward,
                            lambda b: (torch.randint(0, 20, (3, 6), device=DEVICE),
                                       torch.randn(20, 9, device=DEVICE, requires_grad=True),
                                       random_mask(3, 6, DEVICE), b)),
    "llava_projector_forward": (OPS.llava_projector_forward, _projector_args),
    "llava_projector_forward_no_bias": (OPS.llava_projector_forward, lambda b: _projector_args(b, bias=False)),
    "linear_projector_forward": (OPS.linear_projector_forward, _linear_args),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(backend, case):
    op, make = CASES[case]
    torch.library.opcheck(op, make(backend))


# --------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of every functional
# --------------------------------------------------------------------------------------------------


def _gap_step(backend):
    img, cap, im, cm, *_ = _gap_args(backend)
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    return (lambda img, cap, x: fused_gap_loss(img * 2, cap, im, cm, backend=backend)
            + masked_mean(x, backend=backend).square().sum()
            + gap_from_means(img.mean(1), cap.mean(1), backend=backend)), (img, cap, x)


def _text_step(backend):
    ids = torch.randint(0, 20, (3, 6), device=DEVICE)
    table = torch.randn(20, 9, device=DEVICE, requires_grad=True)
    mask = random_mask(3, 6, DEVICE)
    return lambda t: pooled_text_embeddings(ids, t, mask, backend=backend).square().sum(), (table,)


def _llava_step(backend):
    x, w1, b1, w2, b2, mask_flat, _, n, _ = _projector_args(backend)
    x, mask = x.detach().view(3, n, -1).requires_grad_(True), mask_flat.view(3, n)

    def step(x, w1, b1, w2, b2):
        out, pooled = llava_projector(x, w1, b1, w2, b2, mask, backend=backend)
        return out.square().sum() + pooled.sum()
    return step, (x, w1, b1, w2, b2)


def _linear_step(backend):
    x, w, b, mask, _ = _linear_args(backend)

    def step(x, w, b):
        out, pooled = linear_projector(x, w, b, mask, backend=backend)
        return out.square().sum() + pooled.sum()
    return step, (x, w, b)


STEPS = {"gap_loss": _gap_step, "text_pool": _text_step, "llava_projector": _llava_step,
         "linear_projector": _linear_step}


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["auto"] + [p for p in BACKENDS if p.values[0] != "torch"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_torch_compile_fullgraph(compile_backend, backend, step):
    """Each functional traces as its custom ops (fake impls, registered autograd): no graph break, and
    the compiled step gives the eager numbers and gradients."""
    torch._dynamo.reset()
    fn, args = STEPS[step](backend)
    out = torch.compile(fn, fullgraph=True, backend=compile_backend)(*args)
    grads = torch.autograd.grad(out, args)
    ref_args = [a.detach().clone().requires_grad_(True) for a in args]
    ref = fn(*ref_args)
    ref_grads = torch.autograd.grad(ref, ref_args)
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


# --------------------------------------------------------------------------------------------------
# the two routes: custom ops when compiled, the same functions without the custom op's dispatch in eager
# --------------------------------------------------------------------------------------------------

CUSTOM_OPS = {"llava_projector": ("llava_projector_forward", "llava_projector_backward"),
              "linear_projector": ("linear_projector_forward", "linear_projector_backward"),
              "gap_loss": ("gap_loss_forward", "gap_loss_backward", "masked_mean_forward", "masked_mean_backward"),
              "text_pool": ("gather_mean_forward",)}


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("step", sorted(CUSTOM_OPS))
def test_compiled_step_runs_the_custom_ops_and_eager_does_not(step):
    """Compiled, the forward and backward are the custom ops (one opaque node each); in eager mode the
    same functions run without the custom op's dispatch (docs/ops.md, "Eager and compiled")."""
    torch._dynamo.reset()
    fn, args = STEPS[step]("torch")
    graphs = []

    def capture(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def keep(g, _):
            graphs.append(g)
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    torch.autograd.grad(out, args)
    targets = {str(node.target) for g in graphs for node in g.graph.nodes}
    for name in CUSTOM_OPS[step]:
        assert f"regap_fast.{name}.default" in targets, (name, targets)

    with _OpNames() as seen:
        torch.autograd.grad(fn(*args), args)
    assert not any(n.startswith("regap_fast::") for n in seen.names), seen.names
    assert seen.names  # the ATen ops of the same functions
