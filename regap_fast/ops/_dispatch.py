"""Two routes into one definition. Each op's forward and backward are plain Python functions; each is
registered as a ``torch.library`` custom op (with a fake implementation and an autograd formula), which
is what ``torch.compile`` and ``torch.export`` trace: opaque, one node. In eager mode the custom op's
dispatch (schema binding, the alias check of every output, the autograd wrapper, each twice per step)
costs 50-110 us per op and step on the CPU, as much as the small ops around it (docs/ops.md, "Eager
and compiled"), so there the same functions run under a plain ``torch.autograd.Function``, with the
same ``setup_context`` and gradient formula: one definition, tested both ways.
"""

from __future__ import annotations

import functools

import torch


def autograd_function(name: str, forward, setup_context, grad, backward) -> type[torch.autograd.Function]:
    """The eager route: ``forward`` (no ctx), ``setup_context(ctx, inputs, output)`` and
    ``grad(ctx, *grads, backward=...)`` with ``backward`` the plain backward function. The forward
    takes ctx itself (Function's older form): the newer one binds the arguments to the signature with
    ``inspect`` on every call."""

    def forward_with_ctx(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx),
        "backward": staticmethod(functools.partial(grad, backward=backward)),
    })


def register_autograd(op, setup_context, grad, backward_op) -> None:
    """The compiled route: the custom op's autograd formula calls the backward custom op."""
    op.register_autograd(functools.partial(grad, backward=backward_op), setup_context=setup_context)


def run(function: type[torch.autograd.Function], op, *args):
    """``op(*args)`` under torch.compile / export, else the same computation through ``function``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return function.apply(*args)
