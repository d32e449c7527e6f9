"""Which implementation runs an op: ``torch`` (reference), ``triton`` or ``cuda`` (``regap_fast._C``).

Kernels come in families; each backend provides every family with the same primitives, so the ops
dispatch to any backend alike:

* ``gap_loss``  — ``pool_gap_forward``, ``masked_mean_forward``, ``gather_mean_forward``,
  ``broadcast_rows``
  (torch: ``regap_fast.reference``; triton: ``regap_fast.kernels.gap_loss``);
* ``projector`` — ``gelu_gemm_forward``, ``dgelu_gemm_backward``
  (triton: ``regap_fast.kernels.projector``; the torch backend runs the projector as plain autograd).

The cuda backend is ``regap_fast._cuda_backend`` (one module, every family) over ``regap_fast._C``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# What "auto" picks for CUDA tensors: the faster of the two kernel backends at LLaVA-1.5 shapes,
# as measured by benchmarks/run_gpu.py (see benchmarks/results/ and the README's Performance table).
AUTO_ON_CUDA = ("triton", "cuda")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailable(ValueError):
    """The requested backend cannot run these tensors here (raised before any kernel launch)."""


@functools.lru_cache(maxsize=None)
def _triton_module(family: str = "gap_loss") -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module(f"regap_fast.kernels.{family}")
    except Exception as exc:  # triton missing or broken: the torch backend still works
        return None, f"Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return mod, ""


@functools.lru_cache(maxsize=None)
def _cuda_module() -> tuple[ModuleType | None, str]:
    try:
        importlib.import_module("regap_fast._C")
    except ImportError as exc:
        return None, (f"the CUDA extension regap_fast._C is not built ({exc}); reinstall with a CUDA "
                      "toolkit and a CUDA build of PyTorch present: "
                      "REGAP_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    return importlib.import_module("regap_fast._cuda_backend"), ""


def triton_interpreted() -> bool:
    """True when the Triton kernels were compiled for the CPU interpreter (TRITON_INTERPRET=1)."""
    mod, _ = _triton_module()
    return bool(mod is not None and mod.INTERPRETED)


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when backend ``name`` can run tensors of this device and dtype, else the reason."""
    if name == "torch":
        return ""
    if dtype not in KERNEL_DTYPES:
        return f"backend {name!r} supports {', '.join(map(str, KERNEL_DTYPES))}, not {dtype}; use backend='torch'"
    if name == "triton":
        mod, reason = _triton_module()
        if mod is None:
            return reason
        if device.type == "cuda" and not mod.INTERPRETED:
            return ""
        if device.type == "cpu" and mod.INTERPRETED:
            return ""
        if device.type == "cpu":
            return ("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before regap_fast "
                    "is imported, to run the kernels on the CPU for testing)")
        return f"backend 'triton' cannot run tensors on {device} (interpreter mode: {mod.INTERPRETED})"
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        mod, reason = _cuda_module()
        return reason
    raise AssertionError(name)


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a user's backend choice into a concrete one, or raise before anything runs.

    Under torch.compile this runs once at trace time and its answer is a constant of the graph
    (it only inspects what is installed, never tensor data).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            for name in AUTO_ON_CUDA:
                if not why_unavailable(name, device, dtype):
                    return name
        return "torch"
    reason = why_unavailable(backend, device, dtype)
    if reason:
        raise BackendUnavailable(reason)
    return backend


def get(name: str, family: str = "gap_loss") -> ModuleType:
    """The module implementing kernel family ``family`` on backend ``name`` (already resolved)."""
    if name == "torch":
        return importlib.import_module("regap_fast.reference")
    if name == "triton":
        mod, reason = _triton_module(family)
        if mod is None:
            raise BackendUnavailable(reason)
        return mod
    if name == "cuda":
        return _cuda_module()[0]
    raise ValueError(f"unknown backend {name!r}")


def available() -> dict[str, str]:
    """Each backend and whether it can run here: 'yes' or the reason it cannot (for `regap-fast info`)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = {}
    for name in BACKENDS[1:]:
        reason = why_unavailable(name, dev, torch.float32)
        out[name] = "yes" if not reason else reason
    return out
