"""pytest-benchmark harness: `pytest benchmarks --benchmark-only`.

On a GPU the real LLaVA-1.5-7B sizes run and every timed call ends with a device synchronisation
(so the device work is timed, not the launches); on the CPU small sizes run, through the Triton
interpreter for the triton backend, to prove the harness in CI.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from regap_fast import backends  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def backend_params():
    params = []
    for name in ("torch", "triton", "cuda"):
        reason = backends.why_unavailable(name, DEVICE, DTYPE)
        params.append(pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


def synchronized(fn):
    """The timed callable: run fn, then wait for the device (CUDA work is asynchronous)."""
    if not ON_GPU:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
