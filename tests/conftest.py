"""Shared test setup.

Without a GPU the Triton kernels run through the Triton interpreter on the CPU: TRITON_INTERPRET
must be set before the kernels are compiled (imported), so it is set here, first.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from regap_fast import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_backend_params(family: str = "gap_loss"):
    """torch, plus every kernel backend; a missing one is a visible skip, not a silent drop."""
    params = [pytest.param("torch")]
    for name in ("triton", "cuda"):
        reason = backends.why_unavailable(name, DEVICE, torch.float32, family)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if name == "cuda":
            marks.append(pytest.mark.cuda_ext)
        params.append(pytest.param(name, marks=marks))
    return params


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible stream per test: failures can be replayed
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
